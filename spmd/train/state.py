"""TrainState, its shardings, and an init that creates it already sharded.

The optimizer state is sharded exactly like the parameters: `optax.tree_map_params` maps
each parameter's sharding onto the moments that mirror it, and everything else (counts)
is replicated. Without `out_shardings`, `jax.jit(opt.init)` would put it on one device.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spmd import params as P
from spmd.models import Model
from spmd.rules import Rules


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def state_shardings(
    model: Model, opt: optax.GradientTransformation, mesh: Mesh, rules: Rules | None = None
) -> TrainState:
    specs = model.specs()
    param_sh = P.shardings(specs, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(opt.init, P.abstract(specs))
    opt_sh = optax.tree_map_params(
        opt,
        lambda _, sharding: sharding,
        abstract_opt,
        param_sh,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def abstract_state(
    model: Model, opt: optax.GradientTransformation, mesh: Mesh, rules: Rules | None = None
) -> TrainState:
    """ShapeDtypeStructs with shardings: the train step compiles on these without memory."""
    shapes = jax.eval_shape(lambda: _fresh_state(model, opt, jax.random.key(0)))
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        state_shardings(model, opt, mesh, rules),
    )


def _fresh_state(model: Model, opt, key) -> TrainState:
    params = P.init_unsharded(model.specs(), key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))


def init_state(
    model: Model,
    opt: optax.GradientTransformation,
    key: jax.Array,
    mesh: Mesh,
    rules: Rules | None = None,
) -> TrainState:
    """Parameters and optimizer state, born on their shards."""
    shardings = state_shardings(model, opt, mesh, rules)
    return jax.jit(lambda k: _fresh_state(model, opt, k), out_shardings=shardings)(key)
