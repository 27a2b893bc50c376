"""Causal grouped-query attention behind one entry point, its implementation chosen per backend.

Shapes as in gpt.py: q (b, t, h, k), keys and values (b, s, g, k) with h = g * r.

  einsum   scores and softmax materialized in float32, an explicit mask; runs anywhere, and is
           the reference the others are tested against (prefill uses it with padding masks).
  xla      `jax.nn.dot_product_attention(implementation="xla")`: GQA and the causal mask
           handled by JAX.
  blocked  online softmax over key blocks (flash attention's recurrence in plain JAX): the
           (t, s) scores are never whole, only (t, block) at a time.
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel of
           NVIDIA GPUs (GPU only).
  splash   JAX's Pallas TPU splash-attention kernel (splash.py); off a TPU the same kernel in
           Pallas interpret mode, slow, which is how CPU tests check it. The sequence must be
           a multiple of 128.

`auto` picks cudnn on GPUs, splash on TPUs (the portable default inside the pipeline's
shard_map, where splash cannot run) and, elsewhere, the fastest of the portable ones as
measured on this project's CPU (`make bench-attention`; see CPU_DEFAULT).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spmd.errors import SpmdError
from spmd.models import splash
from spmd.parallel import ring_attention
from spmd.rules import current_context

IMPLEMENTATIONS = ("auto", "einsum", "xla", "blocked", "cudnn", "splash")
# Chosen by experiments/attention.py on the 2-core development CPU (float32, gpt-small's
# attention shapes); it is a measurement, so re-run it before changing this.
CPU_DEFAULT = "einsum"
BLOCK = 128  # keys per block of the blocked form
NEG = jnp.finfo(jnp.float32).min


def resolve(impl: str) -> str:
    """The implementation `impl` stands for on the devices the step is traced for."""
    if impl not in IMPLEMENTATIONS:
        raise SpmdError(f"attention={impl!r} must be one of {', '.join(IMPLEMENTATIONS)}")
    platform = _platform()
    if impl == "cudnn" and platform != "gpu":
        raise SpmdError(
            f"attention=cudnn runs on NVIDIA GPUs only, and this step is compiled for {platform} "
            "(spmd explain and plan always compile on CPU); use --attention auto, which is "
            "cuDNN on GPUs and which the GPU profiles' predictions assume"
        )
    if impl != "auto":
        return impl
    if platform == "tpu" and _inside_shard_map():
        return CPU_DEFAULT  # the pipeline's: splash's own shard_map cannot nest in it
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, CPU_DEFAULT)


def _platform() -> str:
    """The platform of the layout being traced, else JAX's default backend. A GPU machine can
    compile a step for its CPU too (as the compiler report does): that step gets CPU's pick."""
    ctx = current_context()
    if ctx is not None and isinstance(ctx.mesh, jax.sharding.Mesh):
        return ctx.mesh.devices.flat[0].platform
    return jax.default_backend()


def _inside_shard_map() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and bool(mesh.manual_axes)


def causal_attention(q_bthk, k_bsgk, v_bsgk, impl: str = "auto", context: str = "ring"):
    """Causal attention of queries at positions 0..t-1 over keys at 0..s-1 (t == s).

    Where the traced layout splits the sequence, it is context-parallel attention (`context`:
    ring or allgather) over zig-zag-ordered q, k, v (spmd/parallel/ring_attention.py).
    """
    if ring_attention.shards() > 1:
        return ring_attention.attention(q_bthk, k_bsgk, v_bsgk, context)
    impl = resolve(impl)
    if impl == "einsum":
        return attend(q_bthk, k_bsgk, v_bsgk, causal_mask(q_bthk.shape[1]))
    if impl == "blocked":
        return blocked(q_bthk, k_bsgk, v_bsgk)
    if impl == "splash":
        return splash.attention(q_bthk, k_bsgk, v_bsgk, interpret=_platform() != "tpu")
    return jax.nn.dot_product_attention(
        q_bthk, k_bsgk, v_bsgk, is_causal=True, implementation=impl
    ).astype(q_bthk.dtype)


def causal_mask(t: int):
    return jnp.tril(jnp.ones((t, t), dtype=bool))[None]


def attend(q_bthk, k_bsgk, v_bsgk, mask_bts):
    """Grouped-query attention with an explicit boolean mask; softmax in float32."""
    b, t, h, kd = q_bthk.shape
    g = k_bsgk.shape[2]
    q = q_bthk.reshape(b, t, g, h // g, kd)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_bsgk, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(kd)
    scores = jnp.where(mask_bts[:, None, None], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bsgk.dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_bsgk)
    return out.reshape(b, t, h, kd)


def blocked(q_bthk, k_bsgk, v_bsgk, block: int = BLOCK):
    """Causal attention by online softmax over key blocks, accumulated in float32."""
    b, t, h, kd = q_bthk.shape
    s, g = k_bsgk.shape[1], k_bsgk.shape[2]
    block = math.gcd(block, s)
    q = q_bthk.reshape(b, t, g, h // g, kd)
    keys = jnp.moveaxis(k_bsgk.reshape(b, s // block, block, g, kd), 1, 0)
    values = jnp.moveaxis(v_bsgk.reshape(b, s // block, block, g, kd), 1, 0)

    def step(carry, kv):
        top, total, acc = carry  # running max and sum (b, g, r, t); output (b, t, g, r, k)
        start, k_blk, v_blk = kv
        scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_blk, preferred_element_type=jnp.float32)
        visible = jnp.arange(t)[:, None] >= start + jnp.arange(block)[None, :]
        scores = jnp.where(visible, scores / math.sqrt(kd), NEG)
        new_top = jnp.maximum(top, scores.max(axis=-1))
        probs = jnp.exp(scores - new_top[..., None])
        scale = jnp.exp(top - new_top)
        total = total * scale + probs.sum(axis=-1)
        part = jnp.einsum("bgrts,bsgk->btgrk", probs.astype(v_blk.dtype), v_blk)
        acc = acc * jnp.moveaxis(scale, -1, 1)[..., None] + part.astype(jnp.float32)
        return (new_top, total, acc), None

    r = h // g
    init = (
        jnp.full((b, g, r, t), NEG, jnp.float32),
        jnp.zeros((b, g, r, t), jnp.float32),
        jnp.zeros((b, t, g, r, kd), jnp.float32),
    )
    starts = jnp.arange(0, s, block)
    (_, total, acc), _ = jax.lax.scan(step, init, (starts, keys, values))
    out = acc / jnp.moveaxis(total, -1, 1)[..., None]
    return out.reshape(b, t, h, kd).astype(q_bthk.dtype)
