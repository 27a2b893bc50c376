"""Flax models in: an NNX or a Linen module as the engine's `Model`.

A Flax module names its parameters' logical axes where it creates them
(`nnx.with_partitioning(init, ("embed", "mlp"))`, `nn.with_logical_partitioning(...)`).
The adapter reads those names from an abstract instance (`eval_shape`: no memory), so spmd's
rules place every parameter, exactly as for its own models. Flax's own sharding machinery
stays off: NNX's eager sharding would want a mesh at construction, and spmd places the
parameters itself, through the jitted init's `out_shardings` (`Model.init_fn`).

The engine sees plain nested dicts of arrays with string keys (orbax, optax and the compiler
report need nothing else); the module's own tree (an NNX `State`, Linen's `params`) is
rebuilt from them by name at the jit boundary, where NNX merges its graphdef with the state.
Only parameters are trained: a module with other state (batch statistics, RNG streams) is
refused, since a pure train step would silently drop its updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec

from spmd.errors import SpmdError
from spmd.models import Model
from spmd.params import ParamSpec

TOKEN_BATCH_AXES = {"inputs": ("batch", "length"), "targets": ("batch", "length")}
ONE_TOKEN = jax.ShapeDtypeStruct((1, 1), jnp.int32)  # what a language model is initialized on

# loss(forward, batch) -> scalar, where forward(x) runs the module on x with the parameters.
Loss = Callable[[Callable[[Any], Any], Mapping[str, jax.Array]], jax.Array]


def next_token_loss(forward, batch) -> jax.Array:
    """Mean cross-entropy of `forward(inputs)`'s logits (b, t, v) against `targets` (b, t)."""
    logits = forward(batch["inputs"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxModule:
    """The `cfg` of an adapted model: its specs, and pure init and apply over engine params."""

    kind: str  # "nnx" or "linen"
    specs: Any  # nested dict of ParamSpec, keyed like the params
    init: Callable[[jax.Array], Any]  # key -> params (nested dict of arrays)
    apply: Callable[[Any, Any], Any]  # (params, x) -> the module's output
    loss: Loss


def nnx_model(
    make: Callable[[nnx.Rngs], nnx.Module],
    *,
    name: str = "flax-nnx",
    loss: Loss = next_token_loss,
    batch_axes: Mapping[str, tuple] = TOKEN_BATCH_AXES,
) -> Model:
    """`make(rngs)` builds the module (e.g. `lambda rngs: MyLM(cfg, rngs=rngs)`)."""

    def build(key):
        with nnx.use_eager_sharding(False):
            return nnx.split(make(nnx.Rngs(key)), nnx.Param, ...)

    graphdef, abstract, rest = nnx.eval_shape(lambda: build(jax.random.key(0)))
    if jax.tree.leaves(rest):
        kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest)})
        raise SpmdError(
            f"NNX module {name!r} holds state other than nnx.Param ({', '.join(kinds)}); "
            "spmd trains parameters only"
        )
    names = _TreeNames(abstract)

    def init(key):
        return names.to_engine(build(key)[1])

    def apply(params, x):
        return nnx.merge(graphdef, names.from_engine(params))(x)

    specs = _specs(names, abstract, nnx.get_partition_spec(abstract))
    return _model(name, FlaxModule("nnx", specs, init, apply, loss), batch_axes)


def linen_model(
    module: nn.Module,
    sample_input: jax.ShapeDtypeStruct = ONE_TOKEN,
    *,
    name: str = "flax-linen",
    loss: Loss = next_token_loss,
    batch_axes: Mapping[str, tuple] = TOKEN_BATCH_AXES,
) -> Model:
    """`module.init` runs on zeros shaped like `sample_input` (default: one token)."""

    def variables(key):
        return module.init(key, jnp.zeros(sample_input.shape, sample_input.dtype))

    boxed = jax.eval_shape(variables, jax.random.key(0))
    others = sorted(set(boxed) - {"params"})
    if others:
        raise SpmdError(
            f"Linen module {name!r} has variable collections besides 'params' "
            f"({', '.join(others)}); spmd trains parameters only"
        )
    abstract = nn.unbox(boxed)["params"]
    names = _TreeNames(abstract)

    def init(key):
        return names.to_engine(nn.unbox(variables(key))["params"])

    def apply(params, x):
        return module.apply({"params": names.from_engine(params)}, x)

    specs = _specs(names, abstract, nn.get_partition_spec(boxed)["params"])
    return _model(name, FlaxModule("linen", specs, init, apply, loss), batch_axes)


def _model(name: str, cfg: FlaxModule, batch_axes) -> Model:
    return Model(name, cfg, _param_specs, _loss_fn, dict(batch_axes), init_fn=_init_fn)


def _param_specs(cfg: FlaxModule):
    return cfg.specs


def _loss_fn(params, batch, cfg: FlaxModule):
    return cfg.loss(lambda x: cfg.apply(params, x), batch)


def _init_fn(cfg: FlaxModule, key):
    return cfg.init(key)


def _created_by_module(key, shape, dtype):
    raise SpmdError("a Flax parameter is created by its module (Model.init), not one by one")


def _specs(names: _TreeNames, abstract, pspecs):
    """ParamSpecs (shape, dtype, the module's logical names) keyed like the engine's params."""
    shapes = names.by_name(abstract)
    axes = names.by_name(pspecs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat = {}
    for key, s in shapes.items():
        logical = tuple(axes.get(key, PartitionSpec()))
        logical += (None,) * (len(s.shape) - len(logical))
        flat[key] = ParamSpec(tuple(s.shape), logical, _created_by_module, s.dtype)
    return traverse_util.unflatten_dict(flat)


class _TreeNames:
    """A module's parameter tree <-> the engine's nested dict with string keys.

    NNX keys list items by int; the engine's keys are all strings (orbax writes them as
    names), so leaves are matched by name, never by position: "10" sorts before "2"."""

    def __init__(self, abstract):
        self.treedef = jax.tree.structure(abstract)
        self.order = list(self.by_name(abstract))

    @staticmethod
    def by_name(tree, is_leaf=None) -> dict[tuple[str, ...], Any]:
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
        return {_path_name(path): leaf for path, leaf in leaves}

    def to_engine(self, tree):
        return traverse_util.unflatten_dict(self.by_name(tree))

    def from_engine(self, params):
        flat = traverse_util.flatten_dict(params)
        return jax.tree.unflatten(self.treedef, [flat[key] for key in self.order])


def _path_name(path) -> tuple[str, ...]:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":  # Variable.value
            parts.append(k.name)
    return tuple(parts)
