"""Hardware profiles, the ring cost of collectives, a roofline step time, and model FLOPs.

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
import functools
import math
from collections.abc import Iterable, Sequence

from spmd.errors import SpmdError

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    peak_flops: float  # dense FLOP/s per device, in `peak_dtype`
    hbm_bytes: float  # memory per device
    hbm_bw: float  # bytes/s per device
    intra_bw: float  # bytes/s one way per device on the fast link (NVLink / ICI)
    inter_bw: float  # bytes/s one way per device between nodes (InfiniBand / DCN)
    devices_per_node: int  # devices that share the fast link
    intra_latency_s: float = 5e-6  # per ring step; order of magnitude, not a datasheet figure
    inter_latency_s: float = 20e-6
    overlaps_comm: bool = True  # async collectives run alongside compute
    memory_in_roofline: bool = False  # the compiled (XLA:CPU) program's bytes are this device's
    shared_host: bool = False  # all devices share the peak and bandwidth (simulated devices)
    usable_memory: float = 0.9  # fraction of memory a step may use (runtime, fragmentation)
    peak_dtype: str = "bfloat16"  # the compute dtype that `peak_flops` was measured in
    matmul_efficiency: float = 1.0  # achieved fraction of peak for large GEMMs (sources below)
    attention_efficiency: float = 1.0  # the same for a fused flash-attention kernel, fwd + bwd
    flash_attention: bool = False  # `--attention auto` picks a fused flash kernel (cuDNN/splash)

    @property
    def capacity_bytes(self) -> float:
        return self.hbm_bytes * self.usable_memory


# Sources, per profile:
#  a100: NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 312 TFLOP/s BF16 dense,
#        80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s (both directions together, so 300 one
#        way); DGX A100: eight 200 Gb/s HDR InfiniBand ports, one per GPU = 25 GB/s.
#  h100: NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s BF16 dense (1,979 with
#        sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (450 one way); DGX H100:
#        eight 400 Gb/s ConnectX-7 NDR ports, one per GPU = 50 GB/s.
#  h200: NVIDIA H200 datasheet (SXM): same compute and NVLink as H100, 141 GB HBM3e at
#        4.8 TB/s; DGX H200 networking as DGX H100.
#  tpu-v4:  cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s,
#        4,096-chip pods on a 3D torus; six ICI links of ~45 GB/s one way each (JAX scaling
#        book, "How to Scale Your Model", TPU chapter) = ~270 GB/s; DCN ~25 Gb/s per chip.
#  tpu-v5e: cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI
#        400 GB/s bidirectional per chip (200 one way), 256-chip pods, 2 x 100 Gb/s NICs per
#        8-chip host = 25 Gb/s per chip of DCN.
#  tpu-v5p: cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s,
#        ICI 1,200 GB/s bidirectional per chip (600 one way), 8,960-chip pods, DCN 50 Gb/s
#        per chip.
#  cpu:  this 2-core development VM, measured with XLA on an idle machine (best of 20): a
#        1024^3 float32 matmul at ~85 GFLOP/s (the table's figure; `get_hardware` replaces
#        it with this host's own, timed), a 256 MB elementwise op at ~8 GB/s; an
#        all-reduce across 8 simulated devices at ~30 us per ring step and ~1 GB/s (4 MB in
#        ~5.7 ms, wall time). Simulated devices share the host's cores and memory, so each
#        gets 1/N of its FLOP/s and bandwidth (`shared_host`), and predictions are the
#        simulation's wall time.
# Achieved efficiency (the prediction's compute runs at peak x efficiency):
#  matmul, h100/h200: 0.84, measured by the speed issue's author on an H200: one large bf16
#        matmul at 832 TFLOP/s of 989 (H100 and H200 share the same compute die).
#  matmul, a100: 0.80, an estimate (not measured here) of the order public cuBLAS GEMM
#        benchmarks report for large bf16 GEMMs on A100 SXM.
#  matmul, TPUs: 0.85, an estimate (not measured here): large bf16 matmuls on the MXU run
#        close to peak (JAX scaling book, "How to Scale Your Model", rooflines chapter).
#  attention, GPUs: 0.5 for a fused flash kernel, forward and backward together:
#        FlashAttention-2 (Dao, 2023) reaches 50-73% of A100 peak forward and less backward;
#        FlashAttention-3 (Shah et al., 2024) measures FA2-class kernels at ~35% on H100 and
#        its own at up to 75% forward. cuDNN's kernel (what spmd uses) lies in that range.
#  attention, TPUs: 0.5 for the Pallas splash kernel, an estimate (not measured here; no
#        published forward + backward fraction found): the GPU figure, for a kernel of its kind.
# For TPUs a "node" is the ICI domain (the pod): any axis inside a pod uses ICI.
_GPU = {"attention_efficiency": 0.5, "flash_attention": True}
_TPU = {"attention_efficiency": 0.5, "flash_attention": True}
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("cpu", "simulated XLA:CPU devices sharing a 2-core host", 85e9, 16 * GB,
                 8 * GB, 1 * GB, 1 * GB, 1024, 30e-6, 30e-6, overlaps_comm=False,
                 memory_in_roofline=True, shared_host=True, peak_dtype="float32"),
        Hardware("a100", "NVIDIA A100 SXM4 80GB", 312e12, 80 * GB, 2039 * GB,
                 300 * GB, 25 * GB, 8, **_GPU, matmul_efficiency=0.80),
        Hardware("h100", "NVIDIA H100 SXM5 80GB", 989e12, 80 * GB, 3350 * GB,
                 450 * GB, 50 * GB, 8, **_GPU, matmul_efficiency=0.84),
        Hardware("h200", "NVIDIA H200 SXM 141GB", 989e12, 141 * GB, 4800 * GB,
                 450 * GB, 50 * GB, 8, **_GPU, matmul_efficiency=0.84),
        Hardware("tpu-v4", "Cloud TPU v4", 275e12, 32 * 2**30, 1200 * GB,
                 270 * GB, 3.1 * GB, 4096, **_TPU, matmul_efficiency=0.85),
        Hardware("tpu-v5e", "Cloud TPU v5e", 197e12, 16 * GB, 819 * GB,
                 200 * GB, 3.1 * GB, 256, **_TPU, matmul_efficiency=0.85),
        Hardware("tpu-v5p", "Cloud TPU v5p", 459e12, 95 * GB, 2765 * GB,
                 600 * GB, 6.25 * GB, 8960, **_TPU, matmul_efficiency=0.85),
    )
}  # fmt: skip


def get_hardware(name: str) -> Hardware:
    """A profile by name. The `cpu` profile's peak is this host's, timed once per process:
    CPUs of one kind differ by 2x (DESIGN.md), and a fixed figure made the progress bar
    show an MFU above 100% on a faster host."""
    if name not in HARDWARE:
        raise SpmdError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}")
    if name == "cpu":
        return dataclasses.replace(HARDWARE[name], peak_flops=host_matmul_flops())
    return HARDWARE[name]


@functools.cache
def host_matmul_flops(rows: int = 4096, n: int = 512, tries: int = 5) -> float:
    """Float32 matmul FLOP/s of this host's CPU devices together: one SPMD matmul whose rows
    are split over every local CPU device, since simulated devices share the cores; the best
    of a few tries, as other work on the host only slows it."""
    import time

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices(backend="cpu")
    rows = max(rows // len(devices), 8) * len(devices)
    mesh = Mesh(np.array(devices), ("d",))
    x = jax.device_put(np.ones((rows, n), np.float32), NamedSharding(mesh, PartitionSpec("d")))
    w = jax.device_put(np.ones((n, n), np.float32), NamedSharding(mesh, PartitionSpec()))
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(x, w).block_until_ready()
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        matmul(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * n * n / best


def dtype_warning(hw: Hardware, dtype: str) -> str | None:
    """Why a prediction for a `dtype` step on `hw` would not hold, or None if it would.

    The accelerator profiles carry a bf16 peak only, on purpose. A float32 peak is not one
    number: XLA may run a float32 matmul as plain FP32 (H100 SXM: 67 TFLOP/s), as TF32
    (494), or, on a TPU, as one to six bf16 passes, depending on the chip and on
    jax_default_matmul_precision. Any one figure would be a guess presented as a
    prediction, so the prediction stays at the bf16 peak and says so.
    """
    if dtype == hw.peak_dtype:
        return None
    return (
        f"the {hw.name} profile has only a {hw.peak_dtype} peak: this {dtype} step's time and "
        f"MFU are predicted as if it computed in {hw.peak_dtype}; use --dtype {hw.peak_dtype} "
        "for a prediction that holds"
    )


def detect_hardware() -> str:
    """The profile for the devices JAX sees (starts the backend); `cpu` if unknown."""
    return _profile_name() or "cpu"


def hardware_of_devices() -> Hardware | None:
    """The profile of the devices JAX runs on, or None for an accelerator without one
    (its MFU is then unknown rather than measured against the wrong peak)."""
    import jax

    name = _profile_name()
    if name is None and jax.devices()[0].platform == "cpu":
        name = "cpu"
    return get_hardware(name) if name else None


def _profile_name() -> str | None:
    import jax

    kind = jax.devices()[0].device_kind.lower()
    for key, name in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("v5p", "tpu-v5p"),
                      ("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v4", "tpu-v4")):  # fmt: skip
        if key in kind:
            return name
    return None


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
