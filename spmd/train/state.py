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

from spmd import params as param_lib
from spmd.layout import Layout, sharded_structs
from spmd.models import Model


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def state_shardings(model: Model, opt: optax.GradientTransformation, layout: Layout) -> TrainState:
    specs = model.specs()
    param_sh = layout.param_shardings(specs)
    abstract_opt = jax.eval_shape(opt.init, param_lib.abstract(specs))
    opt_sh = optax.tree_map_params(
        opt,
        lambda _, sharding: sharding,
        abstract_opt,
        param_sh,
        transform_non_params=lambda _: layout.replicated,
    )
    return TrainState(step=layout.replicated, params=param_sh, opt_state=opt_sh)


def abstract_state(model: Model, opt: optax.GradientTransformation, shardings: TrainState):
    """ShapeDtypeStructs with `shardings`: the train step compiles on these without memory."""
    shapes = jax.eval_shape(lambda: fresh_state(model, opt, jax.random.key(0)))
    return sharded_structs(shapes, shardings)


def fresh_state(model: Model, opt: optax.GradientTransformation, key) -> TrainState:
    params = model.init(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))


def init_state(model: Model, opt: optax.GradientTransformation, key, shardings: TrainState):
    """Parameters and optimizer state, born on their `shardings`."""
    return jax.jit(lambda k: fresh_state(model, opt, k), out_shardings=shardings)(key)
