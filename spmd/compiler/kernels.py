"""One device's step on an accelerator, split into GEMMs, a flash-attention kernel and
elementwise HBM traffic (`Kernels`), from the model's shapes: what `cost.predict` times with
each hardware profile's matmul and attention efficiencies and its memory bandwidth."""

from __future__ import annotations

from spmd.compiler.cost import Hardware, Kernels

# Elementwise HBM traffic as XLA:GPU really moves it, over the minimum counted below: fitted
# to the speed issue's two measured steps of gpt-1b on one H200 (bf16, remat dots, batch
# 16 x 2048): 45.4% MFU with cuDNN attention, 21.8% with materialized einsum attention.
# With 2.0 and the efficiencies above the model gives 42.9% and 23.4%.
ELEMENTWISE_OVERHEAD = 2.0
# fwd + bwd (2x) + recomputed fwd; the `attention` policy recomputes the elementwise work too
_FORWARD_PASSES = {"none": 3, "dots": 4, "full": 4, "attention": 4}
# Policies that recompute the attention itself in the backward pass (`attention` saves it).
_RECOMPUTES_ATTENTION = ("dots", "full")


def uses_flash(cfg, hw: Hardware) -> bool:
    """Whether `cfg`'s attention runs as a fused flash kernel on `hw` (auto: cuDNN on GPUs,
    splash on TPUs)."""
    impl = getattr(cfg, "attention", "auto")
    return impl in ("cudnn", "splash") or (impl == "auto" and hw.flash_attention)


def transformer_kernels(cfg, hw: Hardware, tokens, seq, tensor, flops) -> Kernels:
    """Split one device's step (`tokens` per device of `seq`-long sequences, heads and MLP
    split `tensor` ways, `flops` as the compiled or analytic program counts them, attention
    non-causal) into GEMMs, a flash-attention kernel and elementwise traffic."""
    d, h, g, k, f, v, L = cfg.dims
    remat = getattr(cfg, "remat", "none")
    cb = 2 if getattr(cfg, "compute_dtype", "float32") == "bfloat16" else 4
    full_attention = tokens * 12 * L * h * k * seq / tensor  # what XLA counts (einsum)
    counted = full_attention * (4 / 3 if remat == "full" else 1)
    # Per token and layer, the minimum a fused program moves: the norms, residual adds and
    # rotary read and write d- and (h+g)k-wide rows, SwiGLU reads two f-wide rows and writes
    # one; tensor parallelism splits only the head- and mlp-wide ones.
    layer = cb * (20 * d + (4 * (h + g) * k + 6 * f) / tensor) * _FORWARD_PASSES[remat]
    if uses_flash(cfg, hw):
        # The kernel skips the masked half; a custom call is not a dot, so remat recomputes it.
        attention = full_attention / 2 * (4 / 3 if remat in _RECOMPUTES_ATTENTION else 1)
        matmul = max(flops - counted, 0.0)
    else:
        # Materialized float32 scores: written, softmaxed, read by PV; ~6 passes backward.
        layer += 4 * h / tensor * seq * (10 + (2 if remat in _RECOMPUTES_ATTENTION else 0))
        attention, matmul = 0.0, flops
    logits = 8 * 4 * v / tensor  # float32 logits and softmax, forward and backward
    memory = tokens * (L * layer + logits) * ELEMENTWISE_OVERHEAD
    return Kernels(matmul, attention, memory)
