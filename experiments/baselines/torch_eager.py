"""The same llama-style train step in PyTorch eager, written as a careful PyTorch user would.

The second bar `make bench` holds spmd's step against: RMSNorm, rotary embeddings (half
split), grouped-query causal attention through `F.scaled_dot_product_attention(is_causal=True)`,
SwiGLU, an untied head; AdamW with plain_jax.py's hyper-parameters after global-norm
clipping; float32, eager, one thread per core. torch is optional (the `interop` extra): this
module imports it only when called.
"""

from __future__ import annotations

import os

import numpy as np

# plain_jax.make_step's optimizer: optax.adamw(1e-3, b1=0.9, b2=0.95) (eps 1e-8, weight
# decay 1e-4 on every weight) after clip_by_global_norm(1.0).
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.95), 1e-8, 1e-4, 1.0


def build(cfg):
    """(model, optimizer) for a GPTConfig, float32 on the CPU."""
    # OpenMP's spinning waits collapse torch on a shared machine: at load ~3 on 2 cores the
    # CPU case measured 335 tokens/s spinning and 2,626 passive. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = _model_class()(cfg)
    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    return model, opt


def make_step(cfg):
    """`step(inputs, targets) -> loss tensor`: one AdamW step on int numpy arrays (b, t)."""
    import torch

    model, opt = build(cfg)

    def prepare(inputs, targets):
        return torch.from_numpy(np.asarray(inputs, np.int64)), torch.from_numpy(
            np.asarray(targets, np.int64)
        )

    def step(inputs, targets):
        loss = model.loss(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss.detach()

    return model, prepare, step


def load_spmd_params(model, params) -> None:
    """Copy spmd's gpt parameters (layers stacked, heads split) into the torch model."""
    import torch

    d = model.cfg.d_model

    def put(param, value):
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.array(value, np.float32)))

    put(model.embed.weight, params["embed"])
    put(model.final_norm, params["final_norm"])
    head = params["head"] if "head" in params else np.asarray(params["embed"]).T
    put(model.head.weight, np.asarray(head).T)  # Linear stores (out, in)
    layers = params["layers"]
    for i, blk in enumerate(model.blocks):
        lp = {k: np.asarray(v[i]) for k, v in layers.items()}
        put(blk.attn_norm, lp["attn_norm"])
        put(blk.mlp_norm, lp["mlp_norm"])
        for name in ("wq", "wk", "wv"):
            put(getattr(blk, name).weight, lp[name].reshape(d, -1).T)
        put(blk.wo.weight, lp["wo"].reshape(-1, d).T)
        for name in ("w_gate", "w_up", "w_down"):
            put(getattr(blk, name).weight, lp[name].T)


def _model_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    def rms_norm(x, scale, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale

    def rope(x, cos, sin):  # x: (b, heads, t, k)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            d, h, g, k, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
            self.cfg = cfg
            self.attn_norm = nn.Parameter(torch.ones(d))
            self.mlp_norm = nn.Parameter(torch.ones(d))
            self.wq = nn.Linear(d, h * k, bias=False)
            self.wk = nn.Linear(d, g * k, bias=False)
            self.wv = nn.Linear(d, g * k, bias=False)
            self.wo = nn.Linear(h * k, d, bias=False)
            self.w_gate = nn.Linear(d, f, bias=False)
            self.w_up = nn.Linear(d, f, bias=False)
            self.w_down = nn.Linear(f, d, bias=False)

        def forward(self, x, cos, sin):
            cfg = self.cfg
            b, t, _ = x.shape
            h = rms_norm(x, self.attn_norm, cfg.norm_eps)
            q = self.wq(h).view(b, t, cfg.n_heads, -1).transpose(1, 2)
            k = self.wk(h).view(b, t, cfg.n_kv_heads, -1).transpose(1, 2)
            v = self.wv(h).view(b, t, cfg.n_kv_heads, -1).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            gqa = cfg.n_heads != cfg.n_kv_heads
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            x = x + self.wo(o.transpose(1, 2).reshape(b, t, -1))
            h = rms_norm(x, self.mlp_norm, cfg.norm_eps)
            return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))

    class GPT(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.final_norm = nn.Parameter(torch.ones(cfg.d_model))
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            for p in self.parameters():
                if p.ndim == 2:
                    nn.init.normal_(p, std=cfg.init_std)
            inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2) / cfg.head_dim)
            angles = torch.arange(cfg.max_seq_len)[:, None] * inv
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

        def loss(self, inputs, targets):
            t = inputs.shape[1]
            cos, sin = self.cos[:t], self.sin[:t]
            x = self.embed(inputs)
            for blk in self.blocks:
                x = blk(x, cos, sin)
            logits = self.head(rms_norm(x, self.final_norm, self.cfg.norm_eps))
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    return GPT
