"""The optimizer: optax AdamW on a warmup-cosine schedule, after global-norm clipping; or
plain SGD on the same schedule (no clipping, no weight decay), whose one step on an averaged
gradient equals the average of one step per worker (the local-SGD parity test needs that)."""

from __future__ import annotations

import dataclasses

import jax
import optax

from spmd.errors import SpmdError
from spmd.train.config import OPTIMIZERS


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 10
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    name: str = "adamw"  # one of OPTIMIZERS

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise SpmdError(f"--optimizer {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise SpmdError(f"lr={self.lr} must be positive")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise SpmdError("total_steps must be positive and warmup_steps non-negative")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        # Start above zero so that the first step already moves the parameters.
        init_value=cfg.lr / max(warmup, 1),
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _decay_mask(params):
    # Norm scales are not decayed; every other weight is.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in jax.tree_util.keystr(path), params
    )


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg)
    if cfg.name == "sgd":
        return optax.sgd(schedule), schedule
    opt = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        ),
    )
    return opt, schedule
