"""The KV cache, the prefill pass and one decode step, built from gpt.py's blocks.

Shape letters as in spmd/models/gpt.py, plus  S cache slots.

Prompts of different lengths are left-padded to one length T, so every row writes its next
token into the same cache slot (one dynamic-update-slice for the whole batch). Each row's
positions count from its first real token and its mask hides its padding, so a prompt gets
the same completion alone or in a batch. The cache `[layers, batch, kv_heads, S, head_dim]`
is sharded by logical axes like the parameters (batch over data, kv heads over tensor), so
weights trained on one mesh generate on any other.

Both passes loop over layers in Python, over per-layer weights (`unstack_layers`, done once
per generation): indexing a stacked weight inside a loop copies it, which triples the memory
traffic of a memory-bound decode step (gpt-small, batch 1, this CPU: 34 ms -> 12 ms a step).
jax-llm-examples keeps its layers in a list for the same reason.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from spmd.inference.sampling import NEG
from spmd.models import gpt, moe
from spmd.models.attention import attend, causal_mask
from spmd.rules import Rules, constrain

CACHE_AXES = ("layers", "batch", "kv_heads", None, None)


@struct.dataclass
class KVCache:
    k: jax.Array  # (l, b, g, S, k)
    v: jax.Array


def init_cache(cfg: gpt.GPTConfig, batch: int, slots: int) -> KVCache:
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim)
    # Two separate buffers, so that both can be donated.
    k, v = (constrain(jnp.zeros(shape, cfg.dtype), CACHE_AXES) for _ in range(2))
    return KVCache(k, v)


def attend_cached(q_bthk, k_bgsk, v_bgsk, mask_bts):
    """attention.attend over the cache's (b, g, s, k) layout, so no step transposes the cache.

    A row's t queries and r heads per kv head merge into one axis n = (t, r): the scores are
    then one batched (n, k) x (k, s) product per (b, g), with no transposes of the results
    around it (twice as fast for a decode step on CPU as the `bgrts` layout).
    """
    b, t, h, kd = q_bthk.shape
    g = k_bgsk.shape[1]
    r = h // g
    q = q_bthk.reshape(b, t, g, r, kd).transpose(0, 2, 1, 3, 4).reshape(b, g, t * r, kd)
    scores = jnp.einsum("bgnk,bgsk->bgns", q, k_bgsk, preferred_element_type=jnp.float32)
    mask = jnp.repeat(mask_bts, r, axis=1)[:, None]  # (b, 1, n, s)
    scores = jnp.where(mask, scores / math.sqrt(kd), NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bgsk.dtype)
    out = jnp.einsum("bgns,bgsk->bgnk", probs, v_bgsk)
    return out.reshape(b, g, t, r, kd).transpose(0, 2, 1, 3, 4).reshape(b, t, h, kd)


def _mlp_residual(x_btd, p, cfg: gpt.GPTConfig):
    with jax.named_scope("mlp"):
        h = gpt.rms_norm(x_btd, p["mlp_norm"], cfg.norm_eps)
        # An MoE layer routes each token through its experts, dropless (nothing to balance).
        y = moe.moe_mlp(h, p, cfg, dropless=True)[0] if "router" in p else gpt.mlp(h, p, cfg)
    return constrain(x_btd + y, ("batch", "length", None))


def _last_logits(params, x_btd, cfg: gpt.GPTConfig):
    x = gpt.rms_norm(x_btd[:, -1:], params["final_norm"], cfg.norm_eps)
    return gpt.logits_from_hidden(params, x)[:, 0]


def unstack_layers(params) -> dict:
    """Training's stacked layer weights as a tuple of per-layer dicts, for the unrolled loops."""
    stacked = params["layers"]
    if "moe" in stacked:
        return moe.unstack_layers(params)
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))
    return {**params, "layers": layers}


def _write(cache_lbgsk, new_btgk, layer: int, slot):
    """Put one layer's new keys (or values) into the cache, at slots [slot, slot + t)."""
    new = new_btgk.transpose(0, 2, 1, 3)[None]
    return jax.lax.dynamic_update_slice(
        cache_lbgsk, new.astype(cache_lbgsk.dtype), (layer, 0, 0, slot, 0)
    )


def prefill(params, cache: KVCache, tokens_bt, pad_b, cfg: gpt.GPTConfig):
    """Run the left-padded prompts (b, T), filling cache slots [0, T); -> (logits_bv, cache).

    `params` as from `unstack_layers`.
    """
    b, t = tokens_bt.shape
    s_t = jnp.arange(t)
    cos, sin = gpt.rope_tables(jnp.maximum(s_t - pad_b[:, None], 0), cfg.head_dim, cfg.rope_theta)
    mask = causal_mask(t) & (s_t >= pad_b[:, None])[:, None, :]
    x, ck, cv = gpt.embed(params, tokens_bt, cfg), cache.k, cache.v
    for layer, p in enumerate(params["layers"]):
        with jax.named_scope(f"prefill_{layer}"):
            q, k, v = gpt.qkv(gpt.rms_norm(x, p["attn_norm"], cfg.norm_eps), p, cos, sin, cfg)
            ck, cv = _write(ck, k, layer, 0), _write(cv, v, layer, 0)
            x = _mlp_residual(x + gpt.attn_out(attend(q, k, v, mask), p, cfg), p, cfg)
    cache = KVCache(constrain(ck, CACHE_AXES), constrain(cv, CACHE_AXES))
    return _last_logits(params, x, cfg), cache


def decode_step(params, cache: KVCache, tokens_b, slot, pad_b, cfg: gpt.GPTConfig):
    """One token per row into cache slot `slot`; -> (logits_bv, cache) for the next token.

    `params` as from `unstack_layers`. The cache is updated in place, one slot per layer.
    """
    s_s = jnp.arange(cache.k.shape[3])
    cos, sin = gpt.rope_tables((slot - pad_b)[:, None], cfg.head_dim, cfg.rope_theta)
    mask = ((s_s <= slot) & (s_s >= pad_b[:, None]))[:, None, :]
    x, ck, cv = gpt.embed(params, tokens_b[:, None], cfg), cache.k, cache.v
    for layer, p in enumerate(params["layers"]):
        with jax.named_scope(f"decode_{layer}"):
            q, k, v = gpt.qkv(gpt.rms_norm(x, p["attn_norm"], cfg.norm_eps), p, cos, sin, cfg)
            ck, cv = _write(ck, k, layer, slot), _write(cv, v, layer, slot)
            o = attend_cached(q, ck[layer], cv[layer], mask)
            x = _mlp_residual(x + gpt.attn_out(o, p, cfg), p, cfg)
    cache = KVCache(constrain(ck, CACHE_AXES), constrain(cv, CACHE_AXES))
    return _last_logits(params, x, cfg), cache


def decode_rules(rules: Rules | None) -> Rules:
    """The training rules, less the sequence split: a decode step has one position per row."""
    table = (rules or Rules()).table
    return Rules(tuple((name, () if name == "length" else axes) for name, axes in table))
