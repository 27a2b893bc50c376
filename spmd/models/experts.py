"""Mixture-of-experts feed-forward: top-k routing, grouped matmuls, expert-parallel dispatch.

Shape letters as in gpt.py, plus  e experts (E in all, E/p on each device)  a assignments
(rows x k)  p expert-parallel ranks  c rows of one rank's send buffer to one peer.

Routing (router logits, top-k, gates, the auxiliary losses and capacity drops) runs on the
global rows under the ordinary sharding rules, so its numbers do not depend on the mesh. The
expert computation runs in `jax.shard_map`: each device sorts its assignments by expert,
sends each peer on the `expert` axis the rows for that peer's experts with one `all_to_all`,
runs its own experts as grouped matmuls (`jax.lax.ragged_dot`), and a second `all_to_all`
brings the results home, where each token sums its k outputs weighted by its gates.

`ragged_all_to_all` does not compile on XLA:CPU, so the exchange uses fixed-size buffers.
Dropless, the bound is exact: a token's k choices are distinct experts, so one device sends
one peer at most rows*min(k, E/p) assignments; that is the buffer (p times the average load,
the price of never dropping). With a capacity factor, the buffer is also at most
(E/p)*capacity rows. Unused slots carry a sentinel expert id and no group computes them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spmd.rules import ROWS, constrain, current_context

EXPERT_WEIGHTS = ("we_gate", "we_up", "we_down")


def capacity(rows: int, top_k: int, n_experts: int, factor: float) -> int:
    """Assignments each expert keeps per step (0: dropless)."""
    return math.ceil(factor * rows * top_k / n_experts) if factor > 0 else 0


def route(x_nd, router_de, top_k: int, capacity_rows: int = 0):
    """-> (expert ids (n, k) int32, gates (n, k) float32, stats).

    Gates are the softmax probabilities of the chosen experts, renormalized over the k
    chosen when k > 1 (Switch's k=1 keeps the raw probability, so the router learns). The
    stats are the Switch/GShard load-balancing loss E * sum_e f_e * P_e (f_e: fraction of
    assignments to e, P_e: mean router probability of e; 1.0 when balanced), the router
    z-loss mean(logsumexp(logits)^2) (ST-MoE), and the load histogram f. With a capacity,
    a dropped assignment gets the sentinel id E and `dropped` counts them.
    """
    n_experts = router_de.shape[-1]
    logits = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), router_de.astype(jnp.float32))
    logits = constrain(logits, (ROWS, None))
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, expert_nk = jax.lax.top_k(probs, top_k)
    gate_nk = top_p / jnp.sum(top_p, axis=-1, keepdims=True) if top_k > 1 else top_p
    chosen_ne = jnp.sum(jax.nn.one_hot(expert_nk, n_experts, dtype=jnp.float32), axis=1)
    load_e = jnp.mean(chosen_ne, axis=0) / top_k
    stats = {
        "aux_loss": n_experts * jnp.sum(load_e * jnp.mean(probs, axis=0)),
        "z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        "load": load_e,
    }
    if capacity_rows:
        keep_nk = within_capacity(expert_nk, n_experts, capacity_rows)
        expert_nk = jnp.where(keep_nk, expert_nk, n_experts)
        stats["dropped"] = 1.0 - jnp.mean(keep_nk.astype(jnp.float32))
    return expert_nk, gate_nk, stats


def within_capacity(expert_nk, n_experts: int, capacity_rows: int):
    """Which assignments an expert keeps: the first `capacity_rows` in global token order
    (token-major, a token's choices in rank order). Computed over the global rows, so the
    same tokens drop on every mesh."""
    onehot = jax.nn.one_hot(expert_nk.reshape(-1), n_experts, dtype=jnp.int32)
    before = jnp.cumsum(onehot, axis=0) - onehot  # earlier assignments to the same expert
    position = jnp.sum(before * onehot, axis=-1).reshape(expert_nk.shape)
    return position < capacity_rows


def group_sizes(ids, groups: int):
    """Rows per group id in [0, groups); other ids (sentinels) count nowhere."""
    return jnp.sum(jax.nn.one_hot(ids, groups, dtype=jnp.int32), axis=0)


def expert_ffn(rows_md, sizes_e, w, dtype):
    """SwiGLU of each row through its expert. Rows must be sorted by expert; rows past
    sum(sizes_e) belong to no group and come out zero."""
    gate = jax.lax.ragged_dot(rows_md, w["we_gate"].astype(dtype), sizes_e)
    up = jax.lax.ragged_dot(rows_md, w["we_up"].astype(dtype), sizes_e)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w["we_down"].astype(dtype), sizes_e)


def grouped(rows_md, ids_m, w, n_local: int, dtype):
    """`expert_ffn` of rows in any order, by local expert id (n_local: a sentinel)."""
    order = jnp.argsort(ids_m, stable=True)
    out = expert_ffn(jnp.take(rows_md, order, axis=0), group_sizes(ids_m, n_local), w, dtype)
    return jnp.zeros_like(out).at[order].set(out, unique_indices=True)


def combine(y_ad, gate_nk):
    n, k = gate_nk.shape
    return jnp.einsum("nkd,nk->nd", y_ad.reshape(n, k, -1), gate_nk.astype(y_ad.dtype))


def local_experts(x_nd, expert_nk, gate_nk, w, dtype):
    """Every expert on this device: no exchange (one device, or no `expert` axis)."""
    k = expert_nk.shape[1]
    rows = jnp.repeat(x_nd, k, axis=0)  # assignment a = token a // k
    n_experts = w["we_gate"].shape[0]
    return combine(grouped(rows, expert_nk.reshape(-1), w, n_experts, dtype), gate_nk)


def exchanged_experts(x_nd, expert_nk, gate_nk, w, dtype, *, axes, ranks: int, buffer: int):
    """Inside shard_map: dispatch to the expert owners over `axes`, compute, combine."""
    n, k = expert_nk.shape
    per_rank = w["we_gate"].shape[0]  # this device's experts
    ids = expert_nk.reshape(-1)
    order = jnp.argsort(ids, stable=True)  # by expert, hence by owner
    ids = ids[order]
    peer = ids // per_rank  # == ranks for a dropped assignment: never sent
    counts = group_sizes(peer, ranks)
    slot = jnp.arange(n * k) - jnp.take(jnp.cumsum(counts) - counts, peer, mode="clip")
    rows = jnp.take(x_nd, order // k, axis=0)
    send = jnp.zeros((ranks, buffer, x_nd.shape[1]), x_nd.dtype)
    send = send.at[peer, slot].set(rows, mode="drop")
    send_ids = jnp.full((ranks, buffer), per_rank, jnp.int32)
    send_ids = send_ids.at[peer, slot].set(ids % per_rank, mode="drop")
    recv = jax.lax.all_to_all(send, axes, 0, 0)
    recv_ids = jax.lax.all_to_all(send_ids, axes, 0, 0)
    out = grouped(recv.reshape(ranks * buffer, -1), recv_ids.reshape(-1), w, per_rank, dtype)
    back = jax.lax.all_to_all(out.reshape(ranks, buffer, -1), axes, 0, 0)
    y_sorted = back.at[peer, slot].get(mode="fill", fill_value=0)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    return combine(y, gate_nk)


def moe_ffn(x_nd, expert_nk, gate_nk, w, dtype, capacity_rows: int = 0):
    """The experts' weighted outputs (n, d) for routed rows. Under a layout, experts split
    over the `experts` axis' mesh axes and rows over every mesh axis (the batch axes
    first; the rest only slice rows that were replicated, so no device repeats another's
    work); without one, everything runs here."""
    ctx = current_context()
    sizes = {} if ctx is None else {a: int(s) for a, s in ctx.mesh.shape.items() if s > 1}
    if not sizes:
        return local_experts(x_nd, expert_nk, gate_nk, w, dtype)
    ep_axes = tuple(a for a in ctx.rules.mesh_axes("experts") if a in sizes)
    row_axes = row_split(x_nd.shape[0], ctx.rules.mesh_axes(ROWS), sizes)
    ranks = math.prod(sizes[a] for a in ep_axes)
    n_local = x_nd.shape[0] // math.prod(sizes[a] for a in row_axes)
    per_rank = w["we_gate"].shape[0] // ranks
    buffer = n_local * min(gate_nk.shape[1], per_rank)  # the dropless bound (module doc)
    if capacity_rows:
        buffer = min(buffer, per_rank * capacity_rows)
    if ep_axes:
        body = _partial(exchanged_experts, dtype=dtype, axes=ep_axes, ranks=ranks, buffer=buffer)
    else:
        body = _partial(local_experts, dtype=dtype)
    rows, weights = P(row_axes or None, None), P(ep_axes or None, None, None)
    return jax.shard_map(
        body,
        mesh=ctx.mesh,
        in_specs=(rows, rows, rows, {name: weights for name in EXPERT_WEIGHTS}),
        out_specs=rows,
    )(x_nd, expert_nk, gate_nk, {name: w[name] for name in EXPERT_WEIGHTS})


def row_split(n: int, batch_axes, sizes) -> tuple[str, ...]:
    """Mesh axes to split n rows over: the batch axes, then the others while they divide."""
    axes = tuple(a for a in batch_axes if a in sizes)
    for a in sizes:
        if a not in axes and n % (math.prod(sizes[b] for b in axes) * sizes[a]) == 0:
            axes = (*axes, a)
    return axes


def _partial(fn, **kw):
    return lambda *args: fn(*args, **kw)
