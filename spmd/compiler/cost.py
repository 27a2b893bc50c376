"""The ring cost of collectives, a roofline step time and model FLOPs, on the hardware
profiles of hardware.py.

The one FLOPs convention (used by `spmd explain`, `spmd plan` and every MFU in spmd):

    model FLOPs per token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * S_attn

  - N_matmul counts the weights that enter matrix multiplies: per layer wq, wk, wv, wo
    (wk and wv with the model's own n_kv_heads, so grouped-query attention is counted as
    it is), w_gate, w_up, w_down, plus the output head. The embedding table is a lookup,
    not a matmul, and norm scales are elementwise: neither is in N_matmul.
  - Mixture-of-experts layers count their *active* weights, those a token's FLOPs go
    through: the router (d x E), top_k experts and the shared experts, each 3 * d * d_expert.
    Experts a token is not routed to, and capacity-mode drops, are not counted.
  - 6 = 2 FLOPs per multiply-add, times 3 for the forward pass and the two matmuls of the
    backward pass. Attention scores and the weighted sum (QK^T and PV) are 2 * 2 * h * k
    FLOPs per key in the forward pass, times 3 again: hence 12 * h * k per key.
  - S_attn = seq / 2 for causal attention (on average a token attends to half the
    sequence), the convention of MaxText and Megatron-LM. With `causal=False` it is `seq`,
    which is what spmd's attention actually computes (a full score matrix, then a mask).
    The causal count is the model's useful work and is what MFU uses; the non-causal count
    agrees with XLA's count of the compiled program's matmuls (tests/test_cost.py).
  - Recomputation under remat is not model work: it raises the hardware's FLOPs (XLA's
    count) but never the model FLOPs, so MFU is always model FLOPs over peak.

Step-time prediction (a roofline with communication on top):
    compute   = for accelerators (bf16 peak: see `dtype_warning`), `Kernels`: GEMM FLOPs at
                peak x matmul_efficiency + flash-attention FLOPs at peak x
                attention_efficiency + modelled elementwise HBM traffic / bandwidth
                (`transformer_kernels`; each factor's source is by the profiles). The
                XLA:CPU program's own bytes are only reported (`memory_s`): XLA:GPU/TPU fuse
                far more. For the `cpu` profile (float32) the roofline
                max(HLO FLOPs / peak, HLO bytes / memory bandwidth). Simulated CPU devices
                share one host's cores and memory, so for `cpu` each device gets 1/N of the
                host's FLOP/s and bandwidth: the prediction is then the wall time of the
                simulation.
    each collective costs its ring time on the link it uses: the fast link (NVLink, ICI)
    when the whole group sits inside one node, else the slow one (InfiniBand, DCN);
    traffic that only crosses `data`/`fsdp` (parameter gathers, gradient reductions) is
    hidden behind compute up to the compute time, on hardware that overlaps it; traffic
    that crosses `tensor`, `sequence`, `expert` or `stage` sits on the critical path.
    step = compute + blocking comm + max(0, overlappable comm - compute)
    MFU = model FLOPs per step / (step * peak * devices)
`mfu_at_peak` keeps the old roofline bound (every FLOP at peak, no elementwise time).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

# Re-exported: callers name the profiles through cost (cost.get_hardware, cost.Hardware, ...).
from spmd.compiler.hardware import (  # noqa: F401
    GB,
    HARDWARE,
    Hardware,
    detect_hardware,
    dtype_warning,
    get_hardware,
    hardware_of_devices,
    host_matmul_flops,
)

# --- Collectives ---------------------------------------------------------------------------

OVERLAPPABLE_AXES = frozenset({"data", "fsdp"})


def ring_time(kind: str, nbytes: float, n: int, bandwidth: float, latency: float = 0.0) -> float:
    """Seconds for one ring collective over n devices; nbytes is the full buffer (the
    reduced array for all-reduce/reduce-scatter, the gathered one for all-gather)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps, volume = {
        "all-reduce": (2 * (n - 1), 2 * (n - 1) / n * nbytes),
        "all-gather": (n - 1, (n - 1) / n * nbytes),
        "reduce-scatter": (n - 1, (n - 1) / n * nbytes),
        "all-to-all": (n - 1, (n - 1) / n * nbytes),
        "collective-permute": (1, nbytes),
    }[kind]
    return steps * latency + volume / bandwidth


def within_node(group: Sequence[int], devices_per_node: int) -> bool:
    """Whether a group's devices (ids in mesh order, node-major) share one node."""
    return len({int(i) // devices_per_node for i in group}) <= 1


def collective_time(kind, nbytes, group_size, group, hw: Hardware) -> float:
    intra = within_node(group, hw.devices_per_node)
    bw, lat = (hw.intra_bw, hw.intra_latency_s) if intra else (hw.inter_bw, hw.inter_latency_s)
    ring = ring_time(kind, nbytes, group_size, bw, lat)
    if kind != "all-reduce" or group_size <= 2:
        return ring
    # NCCL switches small all-reduces to double binary trees, whose latency grows as
    # log2(n), not n, at the same bandwidth ("Massively Scale Your Deep Learning Training
    # with NCCL 2.4", NVIDIA blog, 2019): a small all-reduce costs 2 log2(n) latencies.
    tree = ring - 2 * (group_size - 1) * lat + 2 * math.ceil(math.log2(group_size)) * lat
    return min(ring, tree)


def overlappable(axes: Iterable[str]) -> bool:
    axes = set(axes)
    return bool(axes) and axes <= OVERLAPPABLE_AXES


@dataclasses.dataclass(frozen=True)
class CommItem:
    kind: str
    nbytes: float  # per execution
    count: float
    group_size: int
    group: tuple[int, ...]
    axes: tuple[str, ...]

    def time(self, hw: Hardware) -> float:
        return self.count * collective_time(self.kind, self.nbytes, self.group_size, self.group, hw)


# --- Roofline ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kernels:
    """A step's compute on an accelerator, per device, split by what limits each part."""

    matmul_flops: float  # GEMMs: at peak x matmul_efficiency
    attention_flops: float  # a fused flash-attention kernel: at peak x attention_efficiency
    memory_bytes: float  # elementwise work (norms, rotary, SwiGLU, softmax): HBM-bound


@dataclasses.dataclass(frozen=True)
class Prediction:
    compute_s: float
    flops_s: float  # the step's FLOPs at peak: the roofline's compute
    memory_s: float
    comm_s: float
    blocking_comm_s: float
    overlappable_comm_s: float
    exposed_comm_s: float
    step_time_s: float
    tokens_per_s: float
    mfu: float  # predicted: kernels at their achieved efficiency, not at peak
    mfu_at_peak: float  # the roofline bound: every FLOP at peak, no elementwise time
    matmul_efficiency: float
    matmul_s: float
    attention_s: float
    elementwise_s: float

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s > self.flops_s else "compute"

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "bound": self.bound}


def predict(
    hw: Hardware,
    flops_per_device: float,
    bytes_per_device: float,
    comm: Sequence[CommItem],
    model_flops_per_step: float,
    tokens_per_step: float,
    devices: int,
    kernels: Kernels | None = None,
) -> Prediction:
    share = devices if hw.shared_host else 1
    flops_s = flops_per_device * share / hw.peak_flops
    memory_s = bytes_per_device * share / hw.hbm_bw
    parts = _compute_parts(hw, flops_per_device * share, kernels)
    compute = max(flops_s, memory_s) if hw.memory_in_roofline else sum(parts)
    hides = [hw.overlaps_comm and overlappable(c.axes) for c in comm]
    blocking = sum(c.time(hw) for c, h in zip(comm, hides, strict=True) if not h)
    hidden = sum(c.time(hw) for c, h in zip(comm, hides, strict=True) if h)
    exposed = blocking + max(0.0, hidden - compute)
    step = max(compute + exposed, 1e-12)
    at_peak = max(flops_s, memory_s) if hw.memory_in_roofline else flops_s
    step_at_peak = max(at_peak + blocking + max(0.0, hidden - at_peak), 1e-12)
    return Prediction(
        compute_s=compute,
        flops_s=flops_s,
        memory_s=memory_s,
        comm_s=blocking + hidden,
        blocking_comm_s=blocking,
        overlappable_comm_s=hidden,
        exposed_comm_s=exposed,
        step_time_s=step,
        tokens_per_s=tokens_per_step / step,
        mfu=mfu(model_flops_per_step, step, hw, devices),
        mfu_at_peak=mfu(model_flops_per_step, step_at_peak, hw, devices),
        matmul_efficiency=hw.matmul_efficiency,
        matmul_s=parts[0],
        attention_s=parts[1],
        elementwise_s=parts[2],
    )


def _compute_parts(hw: Hardware, flops: float, kernels: Kernels | None):
    """(matmul, attention, elementwise) seconds. Without a kernel split (a model that is not
    a transformer) every FLOP runs at matmul efficiency and elementwise time is unknown."""
    k = kernels or Kernels(flops, 0.0, 0.0)
    return (
        k.matmul_flops / (hw.peak_flops * hw.matmul_efficiency),
        k.attention_flops / (hw.peak_flops * hw.attention_efficiency),
        k.memory_bytes / hw.hbm_bw,
    )


def mfu(model_flops_per_step: float, step_time_s: float, hw: Hardware, devices: int) -> float:
    """Model FLOPs per second over the peak of `devices` devices of `hw`: the one MFU of
    spmd, predicted (`spmd explain`, `spmd plan`) or measured (the training progress bar).
    Simulated devices share one host, whose peak is the profile's."""
    peak = hw.peak_flops if hw.shared_host else hw.peak_flops * devices
    return model_flops_per_step / (step_time_s * peak)


# --- Model FLOPs ---------------------------------------------------------------------------


def matmul_params(cfg) -> int:
    """N_matmul of the convention above (active weights), for a llama-style GPTConfig or
    its mixture-of-experts MoEConfig."""
    d, h, g, k, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attention = 2 * d * h * k + 2 * d * g * k
    moe_layers = getattr(cfg, "n_moe_layers", 0)
    mlp = (cfg.n_layers - moe_layers) * 3 * d * f
    if moe_layers:
        routed = cfg.top_k + cfg.shared_experts
        mlp += moe_layers * (d * cfg.n_experts + routed * 3 * d * cfg.d_expert)
    return cfg.n_layers * attention + mlp + d * cfg.vocab_size


def model_flops_per_token(cfg, seq: int, causal: bool = True) -> float:
    s_attn = seq / 2 if causal else seq
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * s_attn
    return 6 * matmul_params(cfg) + attention


def model_flops_per_step(model, batch: int, seq: int, causal: bool = True) -> float:
    """Training FLOPs of one optimizer step on batch x seq tokens (all devices together)."""
    cfg = model.cfg
    if all(hasattr(cfg, a) for a in ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff")):
        return batch * seq * model_flops_per_token(cfg, seq, causal)
    # Models without a transformer config: 6 N per token when the inputs are token sequences
    # (a Flax language model), else per example.
    per = seq if "length" in model.batch_axes.get("inputs", ()) else 1
    return 6.0 * model.n_params * batch * per
