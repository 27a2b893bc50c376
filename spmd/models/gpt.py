"""A llama-style decoder as pure functions over a pytree of parameters.

Shape letters, used in names and einsums throughout:
  b batch   t query length   s key length   d model width   h query heads
  g kv heads   r query heads per kv head (h = g*r)   k head dim   f MLP width
  v vocabulary   n flattened rows (b*t)   l layers

Dense layers run on 2-D `(n, d)` activations: XLA:CPU's backward pass for 3-D dense
layers is markedly slower (DESIGN.md, performance notes), and the flattened rows keep their
sharding through the merged `(batch, length)` logical axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from spmd.errors import SpmdError
from spmd.models.attention import IMPLEMENTATIONS as ATTENTION
from spmd.models.attention import causal_attention
from spmd.models.loss import cross_entropy
from spmd.models.unroll import layer_unroll
from spmd.parallel import ring_attention
from spmd.params import ParamSpec, normal, ones
from spmd.rules import ROWS, constrain

# none: keep every activation; full: recompute each layer; dots: keep the matmul outputs;
# attention: keep only the named attention activations (the projected q, k, v and the
# attention output), so the backward pass recomputes the MLP and the norms but not the
# attention, the costliest part to redo at long sequences (MaxText's "save_qkv_proj" and
# "save_out_proj" policies together).
REMAT_POLICIES = ("none", "full", "dots", "attention")
SAVED_BY_ATTENTION_POLICY = ("qkv", "attention_out")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 384
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 16
    d_ff: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    remat: str = "none"
    compute_dtype: str = "float32"
    # Layers per scan iteration; 0: auto (unroll.py: whole stacks of up to 8 layers on CPU,
    # unless remat or FSDP gathers need the scan).
    scan_unroll: int = 0
    loss_chunks: int = 0  # rows of the loss computed at a time: 0 picks enough (loss.py)
    attention: str = "auto"  # an implementation of attention.py; auto: per backend
    tie_embeddings: bool = False  # the head is the embedding table's transpose (no `head`)
    # Context parallelism (a `sequence` mesh axis): ring or allgather (ring_attention.py).
    context_parallel: str = "ring"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpmdError(f"{name}={value!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise SpmdError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.attention not in ATTENTION:
            raise SpmdError(f"attention={self.attention!r} must be one of {', '.join(ATTENTION)}")
        if self.context_parallel not in ring_attention.MODES:
            raise SpmdError(
                f"context_parallel={self.context_parallel!r} must be one of "
                f"{', '.join(ring_attention.MODES)}"
            )
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 0:
            raise SpmdError(f"scan_unroll={self.scan_unroll!r} must be 0 (auto) or positive")
        if not isinstance(self.loss_chunks, int) or self.loss_chunks < 0:
            raise SpmdError(f"loss_chunks={self.loss_chunks!r} must be 0 (auto) or positive")
        if self.head_dim % 2:
            raise SpmdError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise SpmdError(f"remat={self.remat!r} must be one of {', '.join(REMAT_POLICIES)}")
        if self.compute_dtype not in DTYPES:
            raise SpmdError(
                f"compute_dtype={self.compute_dtype!r} must be one of {', '.join(DTYPES)}"
            )

    @property
    def dims(self) -> tuple[int, ...]:
        """The shape letters (d, h, g, k, f, v, l) in the order the model code unpacks them."""
        return (self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff,
                self.vocab_size, self.n_layers)  # fmt: skip

    @property
    def dtype(self):
        return DTYPES[self.compute_dtype]


def param_specs(cfg: GPTConfig) -> dict:
    """Every parameter, declared once. Layer weights are stacked on a leading `layers` axis."""
    d, h, g, k, f, v, l = cfg.dims
    std = cfg.init_std
    # GPT-2's scaled init for the projections that write into the residual stream.
    out_std = std / math.sqrt(2 * l)
    specs = {
        "embed": ParamSpec((v, d), ("vocab", "embed"), normal(std)),
        "layers": {
            "attn_norm": ParamSpec((l, d), ("layers", None), ones),
            "wq": ParamSpec((l, d, h, k), ("layers", "embed", "heads", None), normal(std)),
            "wk": ParamSpec((l, d, g, k), ("layers", "embed", "kv_heads", None), normal(std)),
            "wv": ParamSpec((l, d, g, k), ("layers", "embed", "kv_heads", None), normal(std)),
            "wo": ParamSpec((l, h, k, d), ("layers", "heads", None, "embed"), normal(out_std)),
            "mlp_norm": ParamSpec((l, d), ("layers", None), ones),
            "w_gate": ParamSpec((l, d, f), ("layers", "embed", "mlp"), normal(std)),
            "w_up": ParamSpec((l, d, f), ("layers", "embed", "mlp"), normal(std)),
            "w_down": ParamSpec((l, f, d), ("layers", "mlp", "embed"), normal(out_std)),
        },
        "final_norm": ParamSpec((d,), (None,), ones),
        "head": ParamSpec((d, v), ("embed", "vocab"), normal(std)),
    }
    if cfg.tie_embeddings:
        del specs["head"]
    return specs


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale).astype(x.dtype)


def rope_tables(positions_bt, head_dim: int, theta: float):
    """cos and sin of shape (b, t, k/2), in float32, for absolute positions."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthk, cos_btk, sin_btk):
    x1, x2 = jnp.split(x_bthk.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_btk[:, :, None, :], sin_btk[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthk.dtype)


def rows(x_bt_):
    """(b, t, ...) as (b*t, ...) rows for the dense layers, whose backward pass is faster 2-D
    on XLA:CPU. Not where the sequence is split (context parallelism): merging a split
    length into rows is an all-to-all per dense layer, so those layers stay 3-D."""
    if ring_attention.shards() > 1:
        return x_bt_
    return x_bt_.reshape(x_bt_.shape[0] * x_bt_.shape[1], *x_bt_.shape[2:])


def qkv(x_btd, p, cos, sin, cfg: GPTConfig):
    """Projected, rotated queries (b,t,h,k) and keys/values (b,t,g,k) for one layer."""
    b, t, d = x_btd.shape
    dt = cfg.dtype
    x_nd = rows(x_btd)
    # Matmuls against (d, heads*k) views of the weights: XLA:CPU lays 3-D dense layers out
    # with a transpose of the weight and of its gradient per use (DESIGN.md).
    q = (x_nd @ p["wq"].astype(dt).reshape(d, -1)).reshape(b, t, cfg.n_heads, -1)
    k = (x_nd @ p["wk"].astype(dt).reshape(d, -1)).reshape(b, t, cfg.n_kv_heads, -1)
    v = (x_nd @ p["wv"].astype(dt).reshape(d, -1)).reshape(b, t, cfg.n_kv_heads, -1)
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", None))
    k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", None))
    v = constrain(v, ("batch", "length", "kv_heads", None))
    return tuple(checkpoint_name(x, "qkv") for x in (q, k, v))


def attn_out(o_bthk, p, cfg: GPTConfig):
    b, t, h, k = o_bthk.shape
    o = rows(o_bthk)
    o = o.reshape(*o.shape[:-2], h * k)
    out = o @ p["wo"].astype(cfg.dtype).reshape(h * k, -1)
    return out.reshape(b, t, -1)


def mlp(x_btd, p, cfg: GPTConfig):
    b, t, d = x_btd.shape
    dt = cfg.dtype
    x_nd = rows(x_btd)
    gate = jnp.einsum("...d,df->...f", x_nd, p["w_gate"].astype(dt))
    up = jnp.einsum("...d,df->...f", x_nd, p["w_up"].astype(dt))
    row_axes = (ROWS,) if x_nd.ndim == 2 else ("batch", "length")
    hidden = constrain(jax.nn.silu(gate) * up, (*row_axes, "mlp"))
    return jnp.einsum("...f,fd->...d", hidden, p["w_down"].astype(dt)).reshape(b, t, d)


def attention_residual(x_btd, p, cos, sin, cfg: GPTConfig):
    """Pre-norm causal self-attention with its residual (the first half of a layer)."""
    with jax.named_scope("attention"):
        h = rms_norm(x_btd, p["attn_norm"], cfg.norm_eps)
        q, k, v = qkv(h, p, cos, sin, cfg)
        o = checkpoint_name(
            causal_attention(q, k, v, cfg.attention, cfg.context_parallel), "attention_out"
        )
        return x_btd + attn_out(o, p, cfg)


def block(x_btd, p, cos, sin, cfg: GPTConfig):
    """One decoder layer: pre-norm attention and SwiGLU MLP, each with a residual."""
    x_btd = attention_residual(x_btd, p, cos, sin, cfg)
    with jax.named_scope("mlp"):
        h = rms_norm(x_btd, p["mlp_norm"], cfg.norm_eps)
        x_btd = x_btd + mlp(h, p, cfg)
    return constrain(x_btd, ("batch", "length", None))


def remat(fn, policy: str):
    if policy == "none":
        return fn
    saveable = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "attention": jax.checkpoint_policies.save_only_these_names(*SAVED_BY_ATTENTION_POLICY),
    }[policy]
    return jax.checkpoint(fn, policy=saveable, prevent_cse=False)


def embed(params, tokens_bt, cfg: GPTConfig):
    # Gather the table whole before the lookup, as FSDP gathers any weight at its use: a
    # lookup into a table split on both vocab and embed makes XLA replicate and re-split
    # the activations instead ("involuntary full rematerialization").
    table = constrain(params["embed"].astype(cfg.dtype), ("vocab", "embed"))  # cast, then gather
    x = jnp.take(constrain(table, (None, None)), tokens_bt, axis=0)
    return constrain(x, ("batch", "length", None))


def in_compute_dtype(params, cfg: GPTConfig):
    """The layers' matrices cast to the compute dtype while still sharded like the stored
    float32 weights, so FSDP gathers them in that dtype: half the bytes for bfloat16. (The
    gradients come back through the cast, so they are reduce-scattered in it too.) The
    whole stack is cast before the layer scan: a cast inside the loop body let XLA gather
    the float32 slice first."""
    if cfg.dtype == jnp.float32:
        return params
    axes = jax.tree.map(lambda s: s.axes, param_specs(cfg)["layers"], is_leaf=_is_spec)
    layers = jax.tree.map(
        lambda a, w: constrain(w.astype(cfg.dtype), a) if w.ndim > 2 else w,
        axes,
        params["layers"],
        is_leaf=lambda a: isinstance(a, tuple),
    )
    return {**params, "layers": layers}


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def rope_for(tokens_bt, cfg: GPTConfig, positions_t=None):
    """The rotary tables of a (b, t) batch at `positions_t` (default 0..t-1; a permutation
    under context parallelism)."""
    b, t = tokens_bt.shape
    positions_t = jnp.arange(t) if positions_t is None else positions_t
    return rope_tables(jnp.broadcast_to(positions_t, (b, t)), cfg.head_dim, cfg.rope_theta)


def layer_stack(layers, x_btd, cos, sin, cfg: GPTConfig):
    """The stacked decoder layers `layers` (already in the compute dtype) applied in order.
    Public because a pipeline stage runs a slice of the stack (spmd/parallel/pipeline.py)."""

    def body(x, layer_params):
        return block(x, layer_params, cos, sin, cfg), None

    with jax.named_scope("layers"):
        depth = jax.tree.leaves(layers)[0].shape[0]  # a pipeline stage's slice, or all
        unroll = layer_unroll(cfg.scan_unroll, depth, cfg.remat)
        x_btd, _ = jax.lax.scan(remat(body, cfg.remat), x_btd, layers, unroll=unroll)
    return x_btd


def trunk(params, tokens_bt, cfg: GPTConfig, positions_t=None):
    """The residual stream (b, t, d) after the last layer, before the final norm."""
    x = embed(params, tokens_bt, cfg)
    cos, sin = rope_for(tokens_bt, cfg, positions_t)
    return layer_stack(in_compute_dtype(params, cfg)["layers"], x, cos, sin, cfg)


def hidden_states(params, tokens_bt, cfg: GPTConfig, positions_t=None):
    """The final-norm hidden states (b, t, d) of a causal pass over `tokens_bt`."""
    return rms_norm(trunk(params, tokens_bt, cfg, positions_t), params["final_norm"], cfg.norm_eps)


def head_matrix(params):
    """The output head (d, v): its own weight, or the tied embedding table's transpose."""
    return params["head"] if "head" in params else params["embed"].T


def logits_from_hidden(params, x_btd):
    b, t, d = x_btd.shape
    logits = jnp.einsum(
        "nd,dv->nv",
        x_btd.reshape(b * t, d).astype(jnp.float32),
        head_matrix(params).astype(jnp.float32),
    )
    return constrain(logits.reshape(b, t, -1), ("batch", "length", "vocab"))


def in_context_order(*arrays_bt):
    """The sequence order the traced layout runs in: (positions or None, arrays permuted).
    Context parallelism runs in ring_attention's zig-zag order; else nothing moves."""
    order = ring_attention.context_order(arrays_bt[0].shape[1])
    if order is None:
        return None, arrays_bt
    return order, tuple(constrain(a[:, order], ("batch", "length")) for a in arrays_bt)


def forward(params, tokens_bt, cfg: GPTConfig):
    """Logits (b, t, v) in float32."""
    order, (tokens_bt,) = in_context_order(tokens_bt)
    logits = logits_from_hidden(params, hidden_states(params, tokens_bt, cfg, order))
    if order is None:
        return logits
    return constrain(logits[:, np.argsort(order)], ("batch", "length", "vocab"))


def loss_fn(params, batch, cfg: GPTConfig):
    """Mean next-token cross-entropy. batch: `inputs` and `targets`, both (b, t) int32."""
    # Inputs and targets permuted alike: the mean over all positions is unchanged.
    order, (inputs, targets) = in_context_order(batch["inputs"], batch["targets"])
    x = trunk(params, inputs, cfg, order)
    return head_loss(params, x, targets, cfg, in_context_order=order is not None)


def head_loss(params, x_btd, targets_bt, cfg: GPTConfig, in_context_order: bool = False):
    """Final norm, head and mean cross-entropy of the last layer's output `x_btd` (the
    pipeline's last stage computes it per microbatch)."""
    x = rms_norm(x_btd, params["final_norm"], cfg.norm_eps)
    head = constrain(head_matrix(params).astype(cfg.dtype), ("embed", "vocab"))  # gathered cast
    rows = ROWS
    if in_context_order:  # rows in an order that flattens without moving data
        shards = ring_attention.shards()
        x, targets_bt = (ring_attention.shard_major(a, shards) for a in (x, targets_bt))
        rows = ring_attention.SHARD_MAJOR_ROWS
    with jax.named_scope("loss"):
        return cross_entropy(x, head, targets_bt, cfg.loss_chunks, rows)


BATCH_AXES = {"inputs": ("batch", "length"), "targets": ("batch", "length")}


# The llama-* rows are the published Llama-2 shapes; gpt-125m/350m/1b are Llama-style with a
# 32k vocabulary; gpt-tiny and gpt-small use the byte tokenizer's 384.
PRESET_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "d_ff", "max_seq_len")  # fmt: skip
# fmt: off
PRESET_SHAPES = {
    "gpt-tiny":  (384,   128,  4,  8,  4,  16,   384,  256),
    "gpt-small": (384,   384,  6,  6,  2,  64,  1152,  512),
    "gpt-125m":  (32000, 768,  12, 12, 12, 64,  2048, 1024),
    "gpt-350m":  (32000, 1024, 24, 16, 16, 64,  2816, 1024),
    "gpt-1b":    (32000, 2048, 18, 16, 8,  128, 5632, 2048),
    "llama-7b":  (32000, 4096, 32, 32, 32, 128, 11008, 4096),
    "llama-13b": (32000, 5120, 40, 40, 40, 128, 13824, 4096),
    "llama-70b": (32000, 8192, 80, 64, 8,  128, 28672, 4096),
}
# fmt: on


@functools.cache
def presets() -> dict[str, GPTConfig]:
    return {
        name: GPTConfig(**dict(zip(PRESET_FIELDS, shape, strict=True)))
        for name, shape in PRESET_SHAPES.items()
    }
