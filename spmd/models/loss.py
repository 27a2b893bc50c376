"""Next-token cross-entropy from hidden states, in chunks of rows.

Full float32 logits cost rows x vocab x 4 bytes, and a one-hot of the targets as much again:
at batch 16 x 2048 and a 32k vocabulary that is 4 GB apiece. Here the rows are split into
chunks and a `lax.scan` computes one chunk's logits, its log-sum-exp and its target logits at
a time; `jax.checkpoint` on the chunk makes the backward pass recompute them too, so no
more than one chunk of logits is ever live. The chunks are strided (chunk j holds rows j,
j+c, j+2c, ...), so each device's block of rows splits evenly over them and every chunk
keeps the whole mesh busy. The target logit is a one-hot dot, not a gather, so
vocab-sharded logits stay sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spmd.errors import SpmdError
from spmd.rules import ROWS, constrain

CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk, all devices together


def auto_chunks(rows: int, vocab: int, limit: int = CHUNK_BYTES) -> int:
    """The fewest chunks (a power of two dividing `rows`) whose logits fit in `limit`."""
    chunks = 1
    while rows * vocab * 4 / chunks > limit and rows % (2 * chunks) == 0:
        chunks *= 2
    return chunks


def split_rows(x: jax.Array, chunks: int) -> jax.Array:
    """(n, ...) -> (chunks, n/chunks, ...), chunk j holding rows j, j+chunks, ..."""
    return jnp.swapaxes(x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]), 0, 1)


def _nll_sum(x_nd, head_dv, targets_n, rows=ROWS):
    logits = jnp.einsum("nd,dv->nv", x_nd, head_dv, preferred_element_type=jnp.float32)
    logits = constrain(logits, (rows, "vocab"))
    onehot = jax.nn.one_hot(targets_n, head_dv.shape[-1], dtype=logits.dtype)
    target_logit = jnp.sum(logits * onehot, axis=-1)
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - target_logit)


def cross_entropy(x_btd, head_dv, targets_bt, chunks: int = 0, rows=ROWS):
    """Mean next-token cross-entropy of hidden states `x_btd` under the output head.

    `chunks=0` picks `auto_chunks`; the matmul runs in `x_btd`'s dtype and accumulates, like
    everything after it, in float32. `rows`: the logical axes that the merged leading two
    dimensions are split over, major first (context parallelism passes its own).
    """
    b, t, d = x_btd.shape
    n = b * t
    chunks = chunks or auto_chunks(n, head_dv.shape[-1])
    if n % chunks:
        raise SpmdError(f"loss_chunks={chunks} does not divide the {b}x{t}={n} rows of the batch")
    x_nd = constrain(x_btd.reshape(n, d), (rows, None))
    head_dv = head_dv.astype(x_btd.dtype)
    targets_n = targets_bt.reshape(n)
    if chunks == 1:
        return _nll_sum(x_nd, head_dv, targets_n, rows) / n
    xs = constrain(split_rows(x_nd, chunks), (None, rows, None))
    ts = constrain(split_rows(targets_n, chunks), (None, rows))
    chunk_nll = jax.checkpoint(functools.partial(_nll_sum, rows=rows))

    # Per-chunk sums as the scan's outputs, not a running carry: inside a shard_map (the 1F1B
    # pipeline) a zero carry would not vary over the manual axes the chunk sums vary over.
    def body(_, xt):
        return None, chunk_nll(xt[0], head_dv, xt[1])

    _, sums = jax.lax.scan(body, None, (xs, ts))
    return jnp.sum(sums) / n
