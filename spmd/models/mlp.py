"""The seed document's model: Dense(hidden, relu) -> Dense(out), trained with MSE."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spmd.errors import SpmdError
from spmd.params import ParamSpec, glorot_uniform, zeros


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    d_in: int = 10
    d_hidden: int = 10
    d_out: int = 1

    def __post_init__(self):
        for name in ("d_in", "d_hidden", "d_out"):
            if getattr(self, name) < 1:
                raise SpmdError(f"{name}={getattr(self, name)} must be positive")


def param_specs(cfg: MLPConfig) -> dict:
    # Keras' Dense defaults: glorot-uniform kernels and zero biases.
    return {
        "w1": ParamSpec((cfg.d_in, cfg.d_hidden), ("embed", "mlp"), glorot_uniform),
        "b1": ParamSpec((cfg.d_hidden,), ("mlp",), zeros),
        "w2": ParamSpec((cfg.d_hidden, cfg.d_out), ("mlp", "embed"), glorot_uniform),
        "b2": ParamSpec((cfg.d_out,), (None,), zeros),
    }


def forward(params, x_bi, cfg: MLPConfig):
    h = jax.nn.relu(x_bi @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def loss_fn(params, batch, cfg: MLPConfig):
    """Mean squared error over the global batch: what MirroredStrategy's summed sub-task
    losses, scaled by the global batch size, come to."""
    pred = forward(params, batch["x"], cfg)
    return jnp.mean(jnp.square(pred - batch["y"]))


BATCH_AXES = {"x": ("batch", None), "y": ("batch", None)}
