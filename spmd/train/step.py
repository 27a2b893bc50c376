"""The pure train step, and the one place it is jitted with shardings.

`train_step(state, batch) -> (state, metrics)` has no side effects. `compile_step` binds
the model and optimizer, enters the sharding context for tracing, and jits it with in/out
shardings and the state donated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spmd import params as P
from spmd.errors import SpmdError
from spmd.models import Model
from spmd.rules import Rules, batch_shards, constrain, named_sharding, sharding_context
from spmd.train.state import TrainState, state_shardings


def split_microbatches(x: jax.Array, n: int) -> jax.Array:
    """(B, ...) -> (n, B/n, ...), microbatch i holding rows i, i+n, i+2n, ...

    Strided rather than contiguous: each device's contiguous block of rows splits evenly
    across the microbatches, so the split moves no data between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def loss_and_grads(model: Model, params, batch, grad_accum: int):
    grad_fn = jax.value_and_grad(model.loss)
    if grad_accum == 1:
        return grad_fn(params, batch)
    micro = jax.tree.map(lambda x: split_microbatches(x, grad_accum), batch)
    axes = P.logical_axes(model.specs())

    def body(carry, mb):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, mb)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (loss_sum + loss, _constrain_like_params(grad_sum, axes)), None

    zeros = _constrain_like_params(jax.tree.map(jnp.zeros_like, params), axes)
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    return loss_sum / grad_accum, jax.tree.map(lambda g: g / grad_accum, grad_sum)


def _constrain_like_params(tree, axes):
    return jax.tree.map(
        lambda a, x: constrain(x, a), axes, tree, is_leaf=lambda a: isinstance(a, tuple)
    )


def train_step(
    state: TrainState,
    batch,
    *,
    model: Model,
    opt: optax.GradientTransformation,
    schedule: Callable,
    grad_accum: int = 1,
):
    """One optimizer step on the global batch (averaged over `grad_accum` microbatches)."""
    loss, grads = loss_and_grads(model, state.params, batch, grad_accum)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def batch_shardings(model: Model, batch_shapes, mesh: Mesh, rules: Rules | None = None):
    return {
        k: named_sharding(model.batch_axes[k], mesh, rules, shape)
        for k, shape in batch_shapes.items()
    }


def check_batch(global_batch: int, grad_accum: int, mesh: Mesh, rules: Rules | None = None):
    """Each microbatch must split evenly over the batch axes; say so before JAX does."""
    if grad_accum < 1:
        raise SpmdError(f"--grad-accum={grad_accum} must be positive")
    if global_batch % grad_accum:
        raise SpmdError(f"batch={global_batch} is not divisible by grad_accum={grad_accum}")
    shards = batch_shards(mesh, rules)
    micro = global_batch // grad_accum
    if micro % shards:
        axes = (rules or Rules()).mesh_axes("batch")
        split = "*".join(f"{a}={mesh.shape[a]}" for a in axes if mesh.shape[a] > 1)
        what = f"microbatch={micro}" if grad_accum > 1 else f"batch={global_batch}"
        raise SpmdError(f"{what} is not divisible by {split}")


def compile_step(
    model: Model,
    opt: optax.GradientTransformation,
    schedule: Callable,
    mesh: Mesh,
    batch_shapes,
    rules: Rules | None = None,
    grad_accum: int = 1,
):
    """The jitted step: shardings in and out, the state donated, traced in the mesh context."""
    check_batch(next(iter(batch_shapes.values()))[0], grad_accum, mesh, rules)
    step = functools.partial(
        train_step, model=model, opt=opt, schedule=schedule, grad_accum=grad_accum
    )

    def step_in_context(state, batch):
        with sharding_context(mesh, rules):
            return step(state, batch)

    state_sh = state_shardings(model, opt, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_in_context,
        in_shardings=(state_sh, batch_shardings(model, batch_shapes, mesh, rules)),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
