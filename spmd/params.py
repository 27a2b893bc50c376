"""Parameters declared once: shape, dtype, logical axes and initializer.

From a pytree of `ParamSpec` come the abstract pytree, the logical axes and the values.
Where they go on a mesh is the layout's business (`spmd.layout.Layout.param_shardings`,
`abstract_params` and `init_params`, whose `out_shardings` make every parameter born on its
shards, so a model never has to fit on one device).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from spmd.rules import Logical

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: Logical
    init: Initializer
    dtype: Any = jnp.float32

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def _map(fn, specs):
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def abstract(specs) -> Any:
    return _map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs)


def logical_axes(specs) -> Any:
    return _map(lambda s: s.axes, specs)


def init_unsharded(specs, key: jax.Array) -> Any:
    """Values for every spec; each leaf gets its own key from its position in the tree."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    values = [s.init(k, s.shape, s.dtype) for s, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, values)


def count(specs) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=is_spec))


def nbytes(specs) -> int:
    return sum(
        math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
        for s in jax.tree.leaves(specs, is_leaf=is_spec)
    )


# Initializers: each takes (key, shape, dtype).


def normal(stddev: float) -> Initializer:
    return lambda key, shape, dtype: stddev * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def glorot_uniform(key, shape, dtype):
    """Keras' default kernel initializer (fan_in = shape[-2], fan_out = shape[-1])."""
    limit = math.sqrt(6.0 / (shape[-2] + shape[-1]))
    return jax.random.uniform(key, shape, dtype, -limit, limit)
