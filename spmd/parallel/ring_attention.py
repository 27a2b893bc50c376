"""Context parallelism: causal attention with the sequence split over the `length` mesh axes.

When the traced layout splits the logical axis `length` (default rule: mesh axis `sequence`)
S > 1 ways, attention runs in a `jax.shard_map`, manual over the whole mesh: batch and heads
stay split over their own axes exactly as the specs from `spmd.rules` say, and the sequence
is split S ways.

Zig-zag (head-tail) order. The sequence is cut into 2S chunks and device i holds chunks i and
2S-1-i, so under the causal mask every device has the same work (a plain split would leave
the last device S times the first's). The model permutes its tokens, rope positions and
targets once into this order (`zigzag_order`), so the mean loss is unchanged, and un-permutes
where outputs must be in sequence order (`forward`'s logits).

  ring       K/V blocks rotate around the ring with `ppermute` (S-1 hops); each device folds
             every block into an online softmax (flash attention's recurrence) in float32.
             With the zig-zag order, every block but the device's own is exactly half
             visible: either both query chunks see the first key chunk, or the second query
             chunk sees both key chunks. So each hop is two unmasked (c, c) blocks, half of
             the (2c, 2c) a mask would waste.
  allgather  K/V gathered once over the ring, then local attention with a positional causal
             mask: fewer, larger messages; (2c, t) scores per device.

GQA: the K/V heads rotate as they are (g of them), never repeated to the h query heads.

Shape letters as in gpt.py, plus  c the chunk length (t / 2S)  and  j the two chunks a device
holds.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spmd.errors import SpmdError
from spmd.rules import Rules, constrain, current_context, logical_to_spec

MODES = ("ring", "allgather")
NEG = float(jnp.finfo(jnp.float32).min)
Q_AXES = ("batch", "length", "heads", None)
KV_AXES = ("batch", "length", "kv_heads", None)


def sequence_axes(mesh=None, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split `length`; by default in the traced layout."""
    if mesh is None:
        ctx = current_context()
        if ctx is None:
            return ()
        mesh, rules = ctx.mesh, ctx.rules
    sizes = dict(mesh.shape)
    return tuple(a for a in (rules or Rules()).mesh_axes("length") if sizes.get(a, 1) > 1)


def shards(mesh=None, rules: Rules | None = None) -> int:
    """How many ways the sequence is split (1: no context parallelism); by default in the
    traced layout."""
    if mesh is None:
        ctx = current_context()
        if ctx is None:
            return 1
        mesh, rules = ctx.mesh, ctx.rules
    return math.prod(mesh.shape[a] for a in sequence_axes(mesh, rules))


def check_length(t: int, s: int) -> None:
    if s > 1 and t % (2 * s):
        raise SpmdError(
            f"seq={t} is not divisible by 2*sequence={2 * s}: context parallelism's zig-zag "
            f"split gives each of the {s} sequence shards two equal chunks of the sequence"
        )


def zigzag_order(t: int, s: int) -> np.ndarray:
    """Positions in zig-zag order: chunks 0, 2S-1, 1, 2S-2, ..., so that a contiguous split
    in S gives shard i chunks i and 2S-1-i."""
    check_length(t, s)
    chunks = np.arange(t).reshape(2 * s, t // (2 * s))
    return np.concatenate([chunks[c] for i in range(s) for c in (i, 2 * s - 1 - i)])


def context_order(t: int) -> np.ndarray | None:
    """The zig-zag order for a sequence of length t in the traced layout, or None when the
    layout does not split the sequence (then nothing is permuted)."""
    s = shards()
    return zigzag_order(t, s) if s > 1 else None


# The merged (shard, batch) rows of `shard_major`: sequence shards major, then batch.
SHARD_MAJOR_ROWS = ("length", "batch")


def shard_major(x_bt_, s: int):
    """(b, t, ...) -> (S*b, t/S, ...), the S sequence shards leading: each device's block is
    then contiguous, so flattening into rows moves no data (merging a split length after
    the batch would cost an all-to-all). Only for row-order-free uses, like a mean loss."""
    b, t = x_bt_.shape[:2]
    x = x_bt_.reshape(b, s, t // s, *x_bt_.shape[2:]).swapaxes(0, 1)
    x = x.reshape(s * b, t // s, *x_bt_.shape[2:])
    return constrain(x, (SHARD_MAJOR_ROWS, *([None] * (x.ndim - 1))))


def attention(q_bthk, k_bsgk, v_bsgk, mode: str = "ring"):
    """Causal attention over zig-zag-ordered, sequence-split q, k, v (global shapes)."""
    if mode not in MODES:
        raise SpmdError(f"context_parallel={mode!r} must be one of {', '.join(MODES)}")
    ctx = current_context()
    axes = sequence_axes()
    q_spec = logical_to_spec(Q_AXES, ctx.mesh, ctx.rules, q_bthk.shape)
    kv_spec = logical_to_spec(KV_AXES, ctx.mesh, ctx.rules, k_bsgk.shape)
    local = _ring if mode == "ring" else _allgather
    attend = functools.partial(local, axes=axes, s=shards())
    fn = per_device(attend, q_spec, kv_spec, r=q_bthk.shape[2] // k_bsgk.shape[2])
    return jax.shard_map(fn, mesh=ctx.mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec)(
        q_bthk, k_bsgk, v_bsgk
    )


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def per_device(attend, q_spec, kv_spec, r: int):
    """`attend(q, k, v)` as the body of a shard_map whose q and k, v specs are `q_spec` and
    `kv_spec` (batch, length, heads, None), GQA's r query heads per KV head; splash.py's
    kernel shares it."""
    q_heads, kv_heads = _axes(q_spec[2]), _axes(kv_spec[2])
    heads = q_heads if kv_heads != q_heads else ()
    return functools.partial(_local_attention, attend=attend, heads=heads, r=r)


def _local_attention(q, k, v, *, attend, heads: tuple[str, ...], r: int):
    """Per device. When the query heads are split but the KV heads are replicated (tensor
    exceeds the KV heads, rules.REPLICATED_WHEN_INDIVISIBLE), keep only the KV heads this
    device's query heads use."""
    if heads:
        k, v = (_kv_for_local_heads(x, q.shape[2], r, heads) for x in (k, v))
    return attend(q, k, v)


def _kv_for_local_heads(x_bsgk, h_local: int, r: int, heads: tuple[str, ...]):
    first = jax.lax.axis_index(heads) * h_local  # this device's first query head
    if h_local % r == 0:  # whole groups: slice their KV heads
        return jax.lax.dynamic_slice_in_dim(x_bsgk, first // r, h_local // r, axis=2)
    # Groups cut across devices: one KV head per local query head (r = 1 locally).
    return jnp.take(x_bsgk, (first + jnp.arange(h_local)) // r, axis=2)


# --- the blocks of the online softmax ------------------------------------------------------


def _block(q_btgrk, k_bsgk, v_bsgk, mask_ts=None):
    """Unnormalized attention of one query block on one key block, in float32: the row max
    m (b,g,r,t), the row sum l (b,g,r,t) and sum_s exp(score - m) v (b,t,g,r,k)."""
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, k_bsgk, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q_btgrk.shape[-1])
    if mask_ts is not None:
        scores = jnp.where(mask_ts, scores, NEG)
    # The max only keeps exp in range: constant to autodiff, which keeps gradients exact.
    top = jax.lax.stop_gradient(scores.max(axis=-1))
    probs = jnp.exp(scores - top[..., None])
    out = jnp.einsum(
        "bgrts,bsgk->btgrk", probs.astype(v_bsgk.dtype), v_bsgk, preferred_element_type=jnp.float32
    )
    return top, probs.sum(axis=-1), out


def _merge(a, b):
    """Two partial softmaxes over disjoint keys, as one."""
    (m_a, l_a, o_a), (m_b, l_b, o_b) = a, b
    top = jnp.maximum(m_a, m_b)
    s_a, s_b = jnp.exp(m_a - top), jnp.exp(m_b - top)
    return top, l_a * s_a + l_b * s_b, o_a * _per_row(s_a) + o_b * _per_row(s_b)


def _per_row(x_bgrt):
    """(b, g, r, t) row statistics, broadcastable against (b, t, g, r, k) outputs."""
    return jnp.moveaxis(x_bgrt, -1, 1)[..., None]


def _finish(acc):
    _, total, out = acc
    return out / _per_row(total)


def _grouped(q_bthk, g: int):
    b, t, h, kd = q_bthk.shape
    return q_bthk.reshape(b, t, g, h // g, kd)


def _ring(q_bthk, k_bsgk, v_bsgk, *, axes: tuple[str, ...], s: int):
    """Zig-zag ring attention on one device: q, k, v hold chunks (i, 2S-1-i) of the sequence."""
    b, t2, h, kd = q_bthk.shape
    c, g = t2 // 2, k_bsgk.shape[2]
    q0, q1 = jnp.split(_grouped(q_bthk, g), 2, axis=1)
    me = jax.lax.axis_index(axes)
    diag = jnp.tril(jnp.ones((c, c), bool))
    k0, k1 = jnp.split(k_bsgk, 2, axis=1)
    v0, v1 = jnp.split(v_bsgk, 2, axis=1)
    # Own block: chunk i sees itself causally; chunk 2S-1-i sees chunk i and itself causally.
    acc0 = _block(q0, k0, v0, diag)
    acc1 = _merge(_block(q1, k0, v0), _block(q1, k1, v1, diag))
    kv = (k_bsgk, v_bsgk)
    ring = [(d, (d + 1) % s) for d in range(s)]
    for hop in range(1, s):
        kv = jax.lax.ppermute(kv, axes, ring)  # now holding the K/V of shard (me - hop) % S
        acc0, acc1 = _hop(acc0, acc1, q0, q1, kv, earlier=(me - hop) % s < me)
    out = jnp.concatenate([_finish(acc0), _finish(acc1)], axis=1)
    return out.reshape(b, t2, h, kd).astype(q_bthk.dtype)


def _hop(acc0, acc1, q0, q1, kv, earlier):
    """Fold another shard's K/V chunks (j, 2S-1-j) into the accumulators of chunks i and
    2S-1-i. Chunk 2S-1-i always sees chunk j whole. If the sender is earlier (j < i), chunk
    i sees chunk j too; if later, chunk 2S-1-i also sees chunk 2S-1-j; the rest is masked."""
    k0, k1 = jnp.split(kv[0], 2, axis=1)
    v0, v1 = jnp.split(kv[1], 2, axis=1)

    def pick(if_earlier, if_later):
        return jnp.where(earlier, if_earlier, if_later)

    acc1 = _merge(acc1, _block(q1, k0, v0))
    extra = _block(pick(q0, q1), pick(k0, k1), pick(v0, v1))
    acc0 = jax.tree.map(pick, _merge(acc0, extra), acc0)
    acc1 = jax.tree.map(pick, acc1, _merge(acc1, extra))
    return acc0, acc1


def _allgather(q_bthk, k_bsgk, v_bsgk, *, axes: tuple[str, ...], s: int):
    """K/V gathered whole (still in zig-zag order), then a positional causal mask."""
    b, t2, h, kd = q_bthk.shape
    g = k_bsgk.shape[2]
    k_all, v_all = (jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (k_bsgk, v_bsgk))
    order = jnp.asarray(zigzag_order(t2 * s, s))
    mine = jax.lax.dynamic_slice_in_dim(order, jax.lax.axis_index(axes) * t2, t2)
    acc = _block(_grouped(q_bthk, g), k_all, v_all, mine[:, None] >= order[None, :])
    return _finish(acc).reshape(b, t2, h, kd).astype(q_bthk.dtype)
