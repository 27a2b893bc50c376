"""Hardware profiles: peak FLOP/s, memory, links and achieved efficiencies of each device kind
(with their sources), this host's measured CPU peak, and the profile of the devices JAX runs
on. spmd.compiler.cost prices a step on them and re-exports these names."""

from __future__ import annotations

import dataclasses
import functools

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
# Both accelerator kinds run a fused flash kernel under `--attention auto` (cuDNN, splash).
_FLASH = {"attention_efficiency": 0.5, "flash_attention": True}
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("cpu", "simulated XLA:CPU devices sharing a 2-core host", 85e9, 16 * GB,
                 8 * GB, 1 * GB, 1 * GB, 1024, 30e-6, 30e-6, overlaps_comm=False,
                 memory_in_roofline=True, shared_host=True, peak_dtype="float32"),
        Hardware("a100", "NVIDIA A100 SXM4 80GB", 312e12, 80 * GB, 2039 * GB,
                 300 * GB, 25 * GB, 8, **_FLASH, matmul_efficiency=0.80),
        Hardware("h100", "NVIDIA H100 SXM5 80GB", 989e12, 80 * GB, 3350 * GB,
                 450 * GB, 50 * GB, 8, **_FLASH, matmul_efficiency=0.84),
        Hardware("h200", "NVIDIA H200 SXM 141GB", 989e12, 141 * GB, 4800 * GB,
                 450 * GB, 50 * GB, 8, **_FLASH, matmul_efficiency=0.84),
        Hardware("tpu-v4", "Cloud TPU v4", 275e12, 32 * 2**30, 1200 * GB,
                 270 * GB, 3.1 * GB, 4096, **_FLASH, matmul_efficiency=0.85),
        Hardware("tpu-v5e", "Cloud TPU v5e", 197e12, 16 * GB, 819 * GB,
                 200 * GB, 3.1 * GB, 256, **_FLASH, matmul_efficiency=0.85),
        Hardware("tpu-v5p", "Cloud TPU v5p", 459e12, 95 * GB, 2765 * GB,
                 600 * GB, 6.25 * GB, 8960, **_FLASH, matmul_efficiency=0.85),
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
