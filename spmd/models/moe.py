"""The gpt.py decoder with mixture-of-experts MLPs (routing and dispatch: experts.py).

Every `moe_every`-th layer's SwiGLU MLP becomes E experts (top-k routing, optional shared
experts that see every token); the other layers are gpt.py's dense blocks, reused as they are.

Layer structure: the layers form `n_layers / moe_every` identical groups, each some dense
layers (none or one) followed by one MoE layer, and one `lax.scan` runs over the groups.
So every scanned slice has the same pytree (a dense and an MoE layer differ in their
weights), compile time stays flat with depth, and the parameters are two stacks with a
leading `layers` axis: `layers/dense` (gpt.py's layer weights) and `layers/moe` (attention,
router, experts `(l, e, d, f)` on the logical axis `experts`, shared experts).

The loss is cross-entropy plus `aux_loss_weight` x the load-balancing loss plus
`z_loss_weight` x the router z-loss; it returns that objective and the metrics (the loss
parts, the expert load histogram averaged over the MoE layers, the dropped fraction).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from spmd import params as param_lib
from spmd.errors import SpmdError
from spmd.models import experts, gpt
from spmd.models.loss import cross_entropy
from spmd.models.unroll import layer_unroll
from spmd.params import ParamSpec, normal
from spmd.rules import ROWS, constrain

TOP_K = (1, 2)
MOE_EVERY = (1, 2)


@dataclasses.dataclass(frozen=True)
class MoEConfig(gpt.GPTConfig):
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 64  # each expert's SwiGLU width
    moe_every: int = 1  # 1: every layer is MoE; 2: dense and MoE layers alternate
    shared_experts: int = 0  # experts every token goes through (DeepSeek-MoE), width d_expert
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    capacity_factor: float = 0.0  # 0: dropless; else each expert keeps factor*tokens*k/E

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_experts", "d_expert"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpmdError(f"{name}={value!r} must be a positive integer")
        if self.top_k not in TOP_K:
            raise SpmdError(f"top_k={self.top_k!r} must be 1 or 2")
        if self.top_k > self.n_experts:
            raise SpmdError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.moe_every not in MOE_EVERY:
            raise SpmdError(f"moe_every={self.moe_every!r} must be 1 or 2")
        if self.n_layers % self.moe_every:
            raise SpmdError(
                f"n_layers={self.n_layers} is not divisible by moe_every={self.moe_every}"
            )
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise SpmdError(f"shared_experts={self.shared_experts!r} must be 0 or more")
        for name in ("aux_loss_weight", "z_loss_weight", "capacity_factor"):
            if not getattr(self, name) >= 0:
                raise SpmdError(f"{name}={getattr(self, name)!r} must be zero or positive")

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers // self.moe_every

    def capacity(self, rows: int) -> int:
        return experts.capacity(rows, self.top_k, self.n_experts, self.capacity_factor)


def _dense_stack(cfg: MoEConfig, depth: int) -> dict:
    """gpt.py's layer specs stacked `depth` deep, with the residual-scaled init of the
    whole model's depth (gpt.py scales by its own n_layers)."""
    layers = gpt.param_specs(gpt.GPTConfig(**{**_gpt_fields(cfg), "n_layers": depth}))["layers"]
    out = normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)
    return {k: dataclasses.replace(s, init=out) if k in ("wo", "w_down") else s
            for k, s in layers.items()}  # fmt: skip


def param_specs(cfg: MoEConfig) -> dict:
    d, e, fe, g = cfg.d_model, cfg.n_experts, cfg.d_expert, cfg.n_moe_layers
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5
    attn = {k: s for k, s in _dense_stack(cfg, g).items() if k not in ("w_gate", "w_up", "w_down")}
    moe = {
        **attn,
        "router": ParamSpec((g, d, e), ("layers", "embed", None), normal(std)),
        "we_gate": ParamSpec((g, e, d, fe), ("layers", "experts", "embed", "mlp"), normal(std)),
        "we_up": ParamSpec((g, e, d, fe), ("layers", "experts", "embed", "mlp"), normal(std)),
        "we_down": ParamSpec((g, e, fe, d), ("layers", "experts", "mlp", "embed"), normal(out_std)),
    }
    if cfg.shared_experts:
        fs = cfg.shared_experts * fe
        moe["w_gate"] = ParamSpec((g, d, fs), ("layers", "embed", "mlp"), normal(std))
        moe["w_up"] = ParamSpec((g, d, fs), ("layers", "embed", "mlp"), normal(std))
        moe["w_down"] = ParamSpec((g, fs, d), ("layers", "mlp", "embed"), normal(out_std))
    layers = {"moe": moe}
    if cfg.moe_every > 1:
        layers["dense"] = _dense_stack(cfg, g)
    top = gpt.param_specs(gpt.GPTConfig(**{**_gpt_fields(cfg), "n_layers": 1}))
    return {**top, "layers": layers}


def _gpt_fields(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(gpt.GPTConfig)}


def moe_mlp(h_btd, p, cfg: MoEConfig, dropless: bool = False):
    """The MoE MLP of normed activations -> (output (b, t, d), routing stats)."""
    b, t, d = h_btd.shape
    h_nd = constrain(h_btd.reshape(b * t, d), (ROWS, None))
    cap = 0 if dropless else cfg.capacity(b * t)
    expert_nk, gate_nk, stats = experts.route(h_nd, p["router"], cfg.top_k, cap)
    w = {name: p[name] for name in experts.EXPERT_WEIGHTS}
    y = experts.moe_ffn(h_nd, expert_nk, gate_nk, w, cfg.dtype, cap)
    y = constrain(y, (ROWS, None)).reshape(b, t, d)
    if cfg.shared_experts:
        y = y + gpt.mlp(h_btd, p, cfg)
    return y, stats


def moe_block(x_btd, p, cos, sin, cfg: MoEConfig):
    x_btd = gpt.attention_residual(x_btd, p, cos, sin, cfg)
    with jax.named_scope("moe"):
        y, stats = moe_mlp(gpt.rms_norm(x_btd, p["mlp_norm"], cfg.norm_eps), p, cfg)
    return constrain(x_btd + y, ("batch", "length", None)), stats


def group(x_btd, p, cos, sin, cfg: MoEConfig):
    """One scanned group: its dense layer (if any), then its MoE layer."""
    if "dense" in p:
        x_btd = gpt.block(x_btd, p["dense"], cos, sin, cfg)
    return moe_block(x_btd, p["moe"], cos, sin, cfg)


def in_compute_dtype(params, cfg: MoEConfig):
    """As gpt.in_compute_dtype: the stacked matrices cast while still sharded."""
    if cfg.dtype == jnp.float32:
        return params
    axes = param_lib.logical_axes(param_specs(cfg)["layers"])
    layers = jax.tree.map(
        lambda a, w: constrain(w.astype(cfg.dtype), a) if w.ndim > 2 else w,
        axes,
        params["layers"],
        is_leaf=lambda a: isinstance(a, tuple),
    )
    return {**params, "layers": layers}


def hidden_states(params, tokens_bt, cfg: MoEConfig, positions_t=None):
    """Final-norm hidden states (b, t, d) and the routing stats averaged over MoE layers;
    `positions_t` as in gpt.hidden_states (a permutation under context parallelism)."""
    b, t = tokens_bt.shape
    x = gpt.embed(params, tokens_bt, cfg)
    positions_t = jnp.arange(t) if positions_t is None else positions_t
    cos, sin = gpt.rope_tables(jnp.broadcast_to(positions_t, (b, t)), cfg.head_dim, cfg.rope_theta)

    def body(x, layer_params):
        return group(x, layer_params, cos, sin, cfg)

    layers = in_compute_dtype(params, cfg)["layers"]
    with jax.named_scope("layers"):
        unroll = layer_unroll(cfg.scan_unroll, jax.tree.leaves(layers)[0].shape[0], cfg.remat)
        x, stats = jax.lax.scan(gpt.remat(body, cfg.remat), x, layers, unroll=unroll)
    stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
    return gpt.rms_norm(x, params["final_norm"], cfg.norm_eps), stats


def loss_fn(params, batch, cfg: MoEConfig):
    """(objective, metrics): cross-entropy plus the weighted router losses."""
    # Context parallelism runs in gpt's zig-zag order: inputs and targets permuted alike.
    order, (inputs, targets) = gpt.in_context_order(batch["inputs"], batch["targets"])
    x, stats = hidden_states(params, inputs, cfg, order)
    head = constrain(gpt.head_matrix(params).astype(cfg.dtype), ("embed", "vocab"))
    with jax.named_scope("loss"):
        ce = cross_entropy(x, head, targets, cfg.loss_chunks)
    loss = ce + cfg.aux_loss_weight * stats["aux_loss"] + cfg.z_loss_weight * stats["z_loss"]
    metrics = {
        "ce_loss": ce,
        "moe_aux_loss": stats["aux_loss"],
        "moe_z_loss": stats["z_loss"],
        "moe_load": stats["load"],
        # The busiest expert's share over the balanced share: 1.0 is perfectly balanced.
        "moe_load_max": jnp.max(stats["load"]) * cfg.n_experts,
    }
    if "dropped" in stats:
        metrics["moe_dropped"] = stats["dropped"]
    return loss, metrics


def unstack_layers(tree, take=lambda a, i: a[i]) -> dict:
    """The grouped stacks as a tuple of per-layer dicts in depth order (for decoding).
    `take(leaf, i)` slices one group out of a leaf (arrays, or ParamSpecs for shardings)."""
    stacks = tree["layers"]
    depth = jax.tree.leaves(stacks, is_leaf=param_lib.is_spec)[0].shape[0]
    layers = [
        jax.tree.map(functools.partial(take, i=i), stacks[kind], is_leaf=param_lib.is_spec)
        for i in range(depth)
        for kind in ("dense", "moe")
        if kind in stacks
    ]
    return {**tree, "layers": tuple(layers)}


BATCH_AXES = gpt.BATCH_AXES

MOE_FIELDS = ("n_experts", "top_k", "d_expert", "moe_every", "shared_experts")
# fmt: off
# moe-small has gpt-small's attention and active MLP width: top-2 of experts half as wide.
PRESETS = {
    "moe-tiny":  ("gpt-tiny",  dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128),
                  (8, 2, 64, 2, 0)),
    "moe-small": ("gpt-small", {}, (8, 2, 576, 1, 0)),
}
# fmt: on


@functools.cache
def presets() -> dict[str, MoEConfig]:
    dense = gpt.presets()
    return {
        name: MoEConfig(
            **{**_gpt_fields(dense[base]), **fields, **dict(zip(MOE_FIELDS, moe, strict=True))}
        )  # fmt: skip
        for name, (base, fields, moe) in PRESETS.items()
    }
