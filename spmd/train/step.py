"""The pure train step: `train_step(state, batch) -> (state, metrics)`, no side effects.

It is jitted in one place only, `spmd.compiler.program.TrainProgram`, with the layout's
shardings and the state donated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from spmd import params as param_lib
from spmd.models import Model
from spmd.parallel import pipeline as pipeline_lib
from spmd.rules import constrain
from spmd.train.state import TrainState


def split_microbatches(x: jax.Array, n: int) -> jax.Array:
    """(B, ...) -> (n, B/n, ...), microbatch i holding rows i, i+n, i+2n, ...

    Strided rather than contiguous: each device's contiguous block of rows splits evenly
    across the microbatches, so the split moves no data between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def loss_and_grads(model: Model, params, batch, grad_accum: int, pipeline=None):
    """(loss, the model's metrics, grads), each averaged over the microbatches; `pipeline`
    (a PipelineConfig) runs them as a pipeline over the `stage` axis, inside each
    gradient-accumulation microbatch (pipelined models report no metrics of their own)."""
    if pipeline is None:
        grad_fn = jax.value_and_grad(model.loss_and_metrics, has_aux=True)
    else:
        grad_fn = _no_metrics(pipeline_lib.value_and_grad(model, pipeline))
    if grad_accum == 1:
        (loss, aux), grads = grad_fn(params, batch)
        return loss, aux, grads
    micro = jax.tree.map(lambda x: split_microbatches(x, grad_accum), batch)
    axes = param_lib.logical_axes(model.specs())

    def body(carry, mb):
        loss_sum, grad_sum = carry
        (loss, aux), grads = grad_fn(params, mb)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (loss_sum + loss, _constrain_like_params(grad_sum, axes)), aux

    zeros = _constrain_like_params(jax.tree.map(jnp.zeros_like, params), axes)
    init = (jnp.zeros((), jnp.float32), zeros)
    (loss_sum, grad_sum), aux = jax.lax.scan(body, init, micro)
    aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)
    return loss_sum / grad_accum, aux, jax.tree.map(lambda g: g / grad_accum, grad_sum)


def _no_metrics(grad_fn):
    def with_empty_metrics(params, batch):
        loss, grads = grad_fn(params, batch)
        return (loss, {}), grads

    return with_empty_metrics


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
    pipeline=None,
):
    """One optimizer step on the global batch (averaged over `grad_accum` microbatches)."""
    loss, aux, grads = loss_and_grads(model, state.params, batch, grad_accum, pipeline)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        **aux,  # the model's own metrics (MoE: router losses, expert load)
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
