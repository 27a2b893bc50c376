"""Causal attention by JAX's Pallas TPU splash-attention kernel (`attention=splash`).

A thin wrapper over `jax.experimental.pallas.ops.tpu.splash_attention`: one multi-head
kernel per call with a causal mask, grouped-query attention handled by the kernel itself
(h query heads read g KV heads, h = g * r), the batch by `vmap`, the 1/sqrt(k) scale applied
to q. On a TPU it is the compiled Pallas kernel; anywhere else the same kernel runs in
Pallas interpret mode, slow but exact, which is how it is tested on CPU.

A pallas_call cannot be partitioned automatically, so under a mesh the kernel runs inside a
`jax.shard_map`: batch and heads split over the mesh axes the rules give `batch`, `heads`
and `kv_heads`, each device attending over its own rows and heads (the sequence is whole
here; a split sequence goes to ring_attention instead).

Shape letters as in gpt.py.
"""

from __future__ import annotations

import functools
import math

import jax

from spmd.errors import SpmdError
from spmd.parallel import ring_attention
from spmd.rules import current_context, logical_to_spec

LANES = 128  # the kernel's key blocks must be multiples of the TPU's 128 vector lanes
MAX_BLOCK = 512  # a common splash tile; larger ones mostly cost VMEM


def block_size(t: int) -> int:
    """The kernel's query and key tile for a sequence of t: the largest multiple of 128 up
    to 512 that divides t (gcd(512, t) is one exactly when 128 divides t)."""
    block = math.gcd(MAX_BLOCK, t)
    if block % LANES:
        raise SpmdError(
            f"attention=splash needs seq divisible by {LANES}; seq={t} is not (the kernel's "
            f"blocks are multiples of {LANES}): use another --seq or --attention"
        )
    return block


def attention(q_bthk, k_bsgk, v_bsgk, interpret: bool):
    """Causal grouped-query attention, q (b, t, h, k) over k, v (b, t, g, k), in q's dtype;
    `interpret`: Pallas interpret mode (off a TPU)."""
    block_size(q_bthk.shape[1])  # refuse before tracing anything
    local = functools.partial(_attend, interpret=interpret)
    ctx = current_context()
    if ctx is None or ctx.mesh.size == 1:
        return local(q_bthk, k_bsgk, v_bsgk)
    q_spec = logical_to_spec(ring_attention.Q_AXES, ctx.mesh, ctx.rules, q_bthk.shape)
    kv_spec = logical_to_spec(ring_attention.KV_AXES, ctx.mesh, ctx.rules, k_bsgk.shape)
    fn = ring_attention.per_device(local, q_spec, kv_spec, q_bthk.shape[2] // k_bsgk.shape[2])
    # check_vma=False: the kernel's pallas_call declares its outputs without the mesh axes
    # they vary over, which shard_map's varying-axes check refuses. For the same reason it
    # cannot run inside the pipeline's shard_map (pipeline.for_program refuses it there).
    specs = {"in_specs": (q_spec, kv_spec, kv_spec), "out_specs": q_spec, "check_vma": False}
    return jax.shard_map(fn, mesh=ctx.mesh, **specs)(q_bthk, k_bsgk, v_bsgk)


def _attend(q_bthk, k_bsgk, v_bsgk, *, interpret: bool):
    """One device's attention: the kernel over (heads, seq, k) arrays, vmapped over batch."""
    # Imported here, not at the top: only splash users pay for (and need) JAX's Pallas TPU
    # modules; `make bench-gpu` imports the model on machines that may lack them.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    _, t, h, kd = q_bthk.shape
    block = block_size(t)
    sizes = dict.fromkeys(
        ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
         "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"),
        block,
    )  # fmt: skip
    attend = kernel.make_splash_mha(
        masks.MultiHeadMask([masks.CausalMask((t, t))] * h),
        block_sizes=kernel.BlockSizes(**sizes),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    q = (q_bthk * (1 / math.sqrt(kd))).astype(q_bthk.dtype)
    heads_first = lambda x: x.swapaxes(1, 2)  # noqa: E731  (b, t, h, k) <-> (b, h, t, k)
    out = jax.vmap(attend)(heads_first(q), heads_first(k_bsgk), heads_first(v_bsgk))
    return heads_first(out).astype(q_bthk.dtype)
