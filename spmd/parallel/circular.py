"""GPipe and interleaved schedules: a forward loop over ticks, differentiated by autodiff.

Stage s handles, at tick t, the microbatch u = t - s of the pass (V passes of M microbatches
for V virtual stages); device s's chunk v is virtual stage v*S + s. A microbatch leaving the
last stage goes round the ring to stage 0, which keeps it until its next pass begins (that
needs M >= S). Autodiff of the loop keeps every tick's residuals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spmd.models import gpt
from spmd.parallel.stages import (
    AXIS,
    batch_spec,
    chunk,
    data_slices,
    embed_all,
    in_float32,
    manual_axes,
    mesh,
    microbatched,
    param_specs_in,
    prepare,
    put,
    restore_dtypes,
    stages,
    varying,
)


def loss(params, batch, *, cfg: gpt.GPTConfig, microbatches: int, virtual: int):
    """The mean loss of `batch` through the gpipe / interleaved forward loop."""
    n_stages = stages()
    micro = microbatched(batch, microbatches)
    prepared = prepare(params, cfg, n_stages, virtual)
    manual = manual_axes()
    body = functools.partial(
        _circular_body, cfg=cfg, n_stages=n_stages, virtual=virtual, manual=manual
    )
    return jax.shard_map(
        body,
        mesh=mesh(),
        in_specs=(param_specs_in(prepared), batch_spec(manual), batch_spec(manual)),
        out_specs=P(),
        axis_names=set(manual),
    )(prepared, micro["inputs"], micro["targets"])


def _circular_body(params, tokens, targets, *, cfg, n_stages: int, virtual: int, manual):
    s = jax.lax.axis_index(AXIS)
    # Cast before the loop, so that autodiff sums the parameters' gradients across stages
    # and data slices once, after the loop, rather than on every tick.
    params, dtypes = in_float32(params)
    params = varying(params, manual)
    m = tokens.shape[0]
    emb = embed_all(params, tokens, cfg)
    cos, sin = gpt.rope_for(tokens[0], cfg)
    ring = [(k, (k + 1) % n_stages) for k in range(n_stages if virtual > 1 else n_stages - 1)]

    def tick(carry, t):
        recv, pending, outputs = carry
        u = t - s
        uc = jnp.clip(u, 0, virtual * m - 1)
        v, i = uc // m, uc % m
        first = emb[i] if virtual == 1 else jnp.where(v == 0, emb[i], pending[i])
        x = jnp.where(s == 0, first, recv)
        layers = restore_dtypes(chunk(params["layers"], v, virtual), dtypes["layers"])
        y = gpt.layer_stack(layers, x, cos, sin, cfg)
        done = (u >= 0) & (u < virtual * m) & (s == n_stages - 1) & (v == virtual - 1)
        outputs = put(outputs, i, jnp.where(done, y, outputs[i]))
        recv = jax.lax.ppermute(y, AXIS, ring)
        if virtual > 1:  # stage 0 keeps what came round the ring until its next pass
            u_in = t - (n_stages - 1)
            keep = (s == 0) & (u_in >= 0) & (u_in < (virtual - 1) * m)
            j = jnp.maximum(u_in, 0) % m
            pending = put(pending, j, jnp.where(keep, recv, pending[j]))
        return (recv, pending, outputs), None

    zeros = jnp.zeros_like(emb)
    pending = zeros if virtual > 1 else zeros[:0]
    init = varying((zeros[0], pending, zeros), manual)
    ticks = virtual * m + n_stages - 1
    (_, _, outputs), _ = jax.lax.scan(tick, init, jnp.arange(ticks))
    losses = jax.lax.map(lambda xy: gpt.head_loss(params, xy[0], xy[1], cfg), (outputs, targets))
    mine = jnp.where(s == n_stages - 1, jnp.mean(losses), 0.0)
    return jax.lax.psum(mine, manual) / data_slices(manual)
