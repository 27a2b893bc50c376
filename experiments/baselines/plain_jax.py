"""A careful plain-JAX train step for the llama-style model, written as a user would.

The bar `make bench` holds spmd's step against: the same model (RMSNorm, rotary
embeddings, grouped-query causal attention, SwiGLU, an untied head) and the same optimizer
(AdamW after global-norm clipping), with the habits that make XLA:CPU fast: 2-D dense
layers, layers unrolled in Python, one `jax.jit` with the state donated. No sharding, no
metrics beyond the loss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def init_params(cfg, key) -> dict:
    d, h, g, k, f, v, n_layers = cfg.dims
    keys = iter(jax.random.split(key, 2 + 7 * n_layers))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    layers = [
        {
            "attn_norm": jnp.ones((d,)), "mlp_norm": jnp.ones((d,)),
            "wq": normal(d, h * k), "wk": normal(d, g * k), "wv": normal(d, g * k),
            "wo": normal(h * k, d), "w_gate": normal(d, f), "w_up": normal(d, f),
            "w_down": normal(f, d),
        }
        for _ in range(n_layers)
    ]  # fmt: skip
    return {"embed": normal(v, d), "layers": layers, "final_norm": jnp.ones((d,)),
            "head": normal(d, v)}  # fmt: skip


def _norm(x, scale, eps=1e-5):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, cos, sin):  # x: (b, t, heads, k)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(x, p, cfg, cos, sin, mask):
    b, t, _ = x.shape
    h, g, k = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x2 = x.reshape(b * t, -1)
    q = _rope((x2 @ p["wq"]).reshape(b, t, h, k), cos, sin).reshape(b, t, g, h // g, k)
    kk = _rope((x2 @ p["wk"]).reshape(b, t, g, k), cos, sin)
    vv = (x2 @ p["wv"]).reshape(b, t, g, k)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q, kk) / math.sqrt(k)
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, vv).reshape(b * t, h * k)
    return (out @ p["wo"]).reshape(b, t, -1)


def _mlp(x, p):
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)
    return ((jax.nn.silu(x2 @ p["w_gate"]) * (x2 @ p["w_up"])) @ p["w_down"]).reshape(b, t, d)


def loss_fn(params, inputs, targets, cfg):
    b, t = inputs.shape
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2) / cfg.head_dim))
    angles = jnp.arange(t)[:, None] * inv
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    mask = jnp.tril(jnp.ones((t, t), bool))
    x = params["embed"][inputs]
    for p in params["layers"]:
        x = x + _attention(_norm(x, p["attn_norm"]), p, cfg, cos, sin, mask)
        x = x + _mlp(_norm(x, p["mlp_norm"]), p)
    logits = _norm(x, params["final_norm"]).reshape(b * t, -1) @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets.reshape(-1)).mean()


def make_step(cfg, lr: float = 1e-3):
    """(init, step): `step(state, inputs, targets) -> (state, loss)`, jitted and donated."""
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b1=0.9, b2=0.95))

    def init(key):
        params = init_params(cfg, key)
        return params, opt.init(params)

    def step(state, inputs, targets):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(init), jax.jit(step, donate_argnums=0)
