"""The KV cache, the prefill pass and one decode step, built from gpt.py's blocks.

Shape letters as in spmd/models/gpt.py, plus  S cache slots.

Prompts of different lengths are left-padded to one length T, so every row writes its next
token into the same cache slot (one dynamic-update-slice for the whole batch). Each row's
positions count from its first real token and its mask hides its padding, so a prompt gets
the same completion alone or in a batch. The cache `[layers, batch, kv_heads, S, head_dim]`
is sharded by logical axes like the parameters (batch over data, kv heads over tensor), so
weights trained on one mesh generate on any other.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from spmd.inference.sampling import NEG
from spmd.models import gpt
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
    """gpt.attend over the cache's (b, g, s, k) layout, so no step transposes the cache."""
    b, t, h, kd = q_bthk.shape
    g = k_bgsk.shape[1]
    q = q_bthk.reshape(b, t, g, h // g, kd)
    scores = jnp.einsum("btgrk,bgsk->bgrts", q, k_bgsk, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bts[:, None, None], scores / math.sqrt(kd), NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bgsk.dtype)
    out = jnp.einsum("bgrts,bgsk->btgrk", probs, v_bgsk)
    return out.reshape(b, t, h, kd)


def _mlp_residual(x_btd, p, cfg: gpt.GPTConfig):
    with jax.named_scope("mlp"):
        x_btd = x_btd + gpt.mlp(gpt.rms_norm(x_btd, p["mlp_norm"], cfg.norm_eps), p, cfg)
    return constrain(x_btd, ("batch", "length", None))


def _last_logits(params, x_btd, cfg: gpt.GPTConfig):
    x = gpt.rms_norm(x_btd[:, -1:], params["final_norm"], cfg.norm_eps)
    return gpt.logits_from_hidden(params, x)[:, 0]


def prefill(params, cache: KVCache, tokens_bt, pad_b, cfg: gpt.GPTConfig):
    """Run the left-padded prompts (b, T), filling cache slots [0, T); -> (logits_bv, cache)."""
    b, t = tokens_bt.shape
    s_t = jnp.arange(t)
    cos, sin = gpt.rope_tables(jnp.maximum(s_t - pad_b[:, None], 0), cfg.head_dim, cfg.rope_theta)
    mask = gpt.causal_mask(t) & (s_t >= pad_b[:, None])[:, None, :]

    def body(x, p):
        with jax.named_scope("attention"):
            q, k, v = gpt.qkv(gpt.rms_norm(x, p["attn_norm"], cfg.norm_eps), p, cos, sin, cfg)
            x = x + gpt.attn_out(gpt.attend(q, k, v, mask), p, cfg)
        return _mlp_residual(x, p, cfg), (k, v)

    with jax.named_scope("prefill"):
        x, (k_lbtgk, v_lbtgk) = jax.lax.scan(
            body, gpt.embed(params, tokens_bt, cfg), params["layers"]
        )
    k = jax.lax.dynamic_update_slice(cache.k, k_lbtgk.transpose(0, 1, 3, 2, 4), (0,) * 5)
    v = jax.lax.dynamic_update_slice(cache.v, v_lbtgk.transpose(0, 1, 3, 2, 4), (0,) * 5)
    cache = KVCache(constrain(k, CACHE_AXES), constrain(v, CACHE_AXES))
    return _last_logits(params, x, cfg), cache


def decode_step(params, cache: KVCache, tokens_b, slot, pad_b, cfg: gpt.GPTConfig):
    """One token per row into cache slot `slot`; returns (logits_bv, cache) for the next token."""
    slots = cache.k.shape[3]
    s_s = jnp.arange(slots)
    cos, sin = gpt.rope_tables((slot - pad_b)[:, None], cfg.head_dim, cfg.rope_theta)
    mask = ((s_s <= slot) & (s_s >= pad_b[:, None]))[:, None, :]

    # The whole cache rides in the carry and is updated in place, one layer's slot at a time;
    # scanning it as xs/ys would copy every layer's cache each step.
    def body(carry, xs):
        x, ck, cv = carry
        p, layer = xs
        with jax.named_scope("attention"):
            q, k, v = gpt.qkv(gpt.rms_norm(x, p["attn_norm"], cfg.norm_eps), p, cos, sin, cfg)
            at = (layer, 0, 0, slot, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3)[None], at)
            cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3)[None], at)
            k_bgsk = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
            v_bgsk = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
            x = x + gpt.attn_out(attend_cached(q, k_bgsk, v_bgsk, mask), p, cfg)
        return (_mlp_residual(x, p, cfg), ck, cv), None

    x = gpt.embed(params, tokens_b[:, None], cfg)
    xs = (params["layers"], jnp.arange(cfg.n_layers))
    with jax.named_scope("decode"):
        (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), xs)
    cache = KVCache(constrain(k, CACHE_AXES), constrain(v, CACHE_AXES))
    return _last_logits(params, x, cfg), cache


def decode_rules(rules: Rules | None) -> Rules:
    """The training rules, less the sequence split: a decode step has one position per row."""
    table = (rules or Rules()).table
    return Rules(tuple((name, () if name == "length" else axes) for name, axes in table))
