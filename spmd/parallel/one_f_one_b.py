"""The 1F1B pipeline schedule: one forward and one backward per stage per tick, by hand.

GPipe differentiates its forward loop, so autodiff keeps the residuals of every tick: live
activations grow with the number of microbatches M. Here the loop computes the gradients
itself, and a microbatch's activations die as soon as its backward has run:

- forward of microbatch i on stage s at tick i + s; its stage input is stashed;
- the last stage computes the loss (final norm, head, cross-entropy) of the microbatch it
  has just finished, and its cotangent starts that microbatch's backward in the same tick;
- backward of microbatch i on stage s at tick i + 2(S-1) - s: `jax.vjp` of the stage
  function, recomputed from the stashed input (stage-level rematerialization: 2F+B of work
  per microbatch and stage instead of F+B, but only one tick's residuals are ever live);
- stage 0 turns its input cotangents into the embedding's gradient at once.

A microbatch waits 2(S-1-s) ticks between its forward and backward on stage s, so each stage
stashes at most 2S-1 inputs (one (b, t, d) activation each), whatever M is. The loop runs in
three phases so that no tick pays for work that cannot exist yet: S-1 forward-only ticks, M
ticks of both, S-1 backward-only ticks; each stage idles (S-1)/(M+S-1) of its time, as in
GPipe. Ticks that hold no microbatch run masked on zero cotangents, which leave every
gradient exactly unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spmd.models import gpt
from spmd.parallel import stages as st


def value_and_grad(params, batch, *, cfg: gpt.GPTConfig, microbatches: int):
    """The mean loss of `batch` and its gradients with respect to `params`."""
    n_stages = st.stages()
    micro = st.microbatched(batch, microbatches)
    # The cast to the compute dtype runs outside the loop; its vjp maps gradients back.
    prepared, back = jax.vjp(lambda p: st.prepare(p, cfg, n_stages, 1), params)
    specs = st.param_specs_in(prepared)
    manual = st.manual_axes()
    body = functools.partial(_body, cfg=cfg, n_stages=n_stages, manual=manual)
    loss, grads = jax.shard_map(
        body,
        mesh=st.mesh(),
        in_specs=(specs, st.batch_spec(manual), st.batch_spec(manual)),
        out_specs=(P(), specs),
        axis_names=set(manual),
    )(prepared, micro["inputs"], micro["targets"])
    # The float32 sums round once to the compute dtype here, as the unpipelined step's do.
    (grads,) = back(st.restore_dtypes(grads, jax.tree.map(lambda w: w.dtype, prepared)))
    return loss, grads


def _add(total, g):
    """A tick's gradient into its float32 accumulator (`st.in_float32`)."""
    return total + g.astype(total.dtype)


def _body(params, tokens, targets, *, cfg: gpt.GPTConfig, n_stages: int, manual):
    axis, last = st.AXIS, n_stages - 1
    s = jax.lax.axis_index(axis)
    m = tokens.shape[0]
    stash_slots = min(m, 2 * n_stages - 1)
    # Every parameter marked as varying over the manual axes: the gradients each stage and
    # data slice takes below stay its own (no implicit psum per tick) until the end.
    params, dtypes = st.in_float32(params)
    params = st.varying(params, manual)
    layers = st.restore_dtypes(params["layers"], dtypes["layers"])
    head = {"final_norm": params["final_norm"], "head": params["head"]}
    cos, sin = gpt.rope_for(tokens[0], cfg)

    def stage_fn(layers, x):
        return gpt.layer_stack(layers, x, cos, sin, cfg)

    def embed(table, tok):
        return gpt.embed({"embed": table}, tok, cfg)

    def forward(carry, t):
        recv_f, stash, grads, loss_sum = carry[0], carry[2], carry[3], carry[4]
        i = t - s
        ok = (i >= 0) & (i < m)
        ic = jnp.clip(i, 0, m - 1)
        x = jnp.where(s == 0, embed(params["embed"], tokens[ic]), recv_f)
        slot = ic % stash_slots
        stash = st.put(stash, slot, jnp.where(ok, x, stash[slot]))
        y = stage_fn(layers, x)
        mine = ok & (s == last)
        loss_i, head_vjp = jax.vjp(lambda h, y: gpt.head_loss(h, y, targets[ic], cfg), head, y)
        scale = st.varying(jnp.where(mine, 1.0 / m, 0.0).astype(loss_i.dtype), manual)
        d_head, dy = head_vjp(scale)
        grads = {**grads, **jax.tree.map(_add, {k: grads[k] for k in d_head}, d_head)}
        loss_sum = loss_sum + jnp.where(mine, loss_i, 0.0)
        recv_f = jax.lax.ppermute(y, axis, [(k, k + 1) for k in range(last)])
        return (recv_f, carry[1], stash, grads, loss_sum), dy

    def backward(carry, t, dy):
        recv_b, stash, grads = carry[1], carry[2], carry[3]
        i = t - 2 * last + s
        ic = jnp.clip(i, 0, m - 1)
        g = jnp.where(s == last, dy, recv_b)
        _, stage_vjp = jax.vjp(stage_fn, layers, stash[ic % stash_slots])
        d_layers, dx = stage_vjp(g)
        first = (i >= 0) & (i < m) & (s == 0)
        _, embed_vjp = jax.vjp(lambda table: embed(table, tokens[ic]), params["embed"])
        d_embed = embed_vjp(jnp.where(first, dx, jnp.zeros_like(dx)))[0]
        grads = {
            **grads,
            "layers": jax.tree.map(_add, grads["layers"], d_layers),
            "embed": _add(grads["embed"], d_embed),
        }
        recv_b = jax.lax.ppermute(dx, axis, [(k + 1, k) for k in range(last)])
        return (carry[0], recv_b, stash, grads, carry[4])

    def tick(carry, t, fwd: bool, bwd: bool):
        dy = jnp.zeros_like(carry[0])
        if fwd:
            carry, dy = forward(carry, t)
        if bwd:
            carry = backward(carry, t, dy)
        return carry, None

    act = jnp.zeros((*tokens.shape[1:], cfg.d_model), cfg.dtype)
    stash = jnp.zeros((stash_slots, *act.shape), act.dtype)
    zeros = jax.tree.map(jnp.zeros_like, params)
    carry = st.varying((act, act, stash, zeros, jnp.zeros((), jnp.float32)), manual)
    phases = (
        (0, last, True, False),  # warm-up: forwards only
        (last, m + last, True, True),  # steady state: one forward and one backward
        (m + last, m + 2 * last, False, True),  # cool-down: backwards only
    )
    for start, stop, fwd, bwd in phases:
        step = functools.partial(tick, fwd=fwd, bwd=bwd)
        carry, _ = jax.lax.scan(step, carry, jnp.arange(start, stop))
    grads, loss_sum = carry[3], carry[4]
    # Only the last stage holds the loss and the head's gradients, only stage 0 the
    # embedding's: the psum over `stage` gives every stage the whole. Each data slice
    # averaged its own rows: the mean over `data` gives the batch's.
    slices = st.data_slices(manual)
    data = tuple(a for a in manual if a != axis)
    grads = {
        k: jax.tree.map(
            lambda g, k=k: jax.lax.psum(g, data if k == "layers" else manual) / slices, v
        )
        for k, v in grads.items()
    }
    return jax.lax.psum(loss_sum, manual) / (m * slices), grads
