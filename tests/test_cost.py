"""Hardware profiles, ring costs, the step-time prediction and the model FLOPs convention."""

import jax
import pytest

import spmd
from spmd import params as param_lib
from spmd.compiler import cost, report
from spmd.compiler.program import TrainProgram
from spmd.errors import SpmdError


def test_profiles_are_complete():
    assert set(cost.HARDWARE) == {"cpu", "a100", "h100", "h200", "tpu-v4", "tpu-v5e", "tpu-v5p"}
    for hw in cost.HARDWARE.values():
        assert hw.peak_flops > 0 and hw.hbm_bytes > 0 and hw.hbm_bw > 0
        assert hw.intra_bw >= hw.inter_bw > 0 and hw.devices_per_node >= 1
    assert cost.get_hardware("h100").peak_flops == 989e12
    with pytest.raises(SpmdError, match="unknown hardware 'b200'"):
        cost.get_hardware("b200")


def test_ring_formulas():
    n, s, bw = 8, 8e9, 1e9
    assert cost.ring_time("all-reduce", s, n, bw) == pytest.approx(2 * 7 / 8 * 8)
    assert cost.ring_time("all-gather", s, n, bw) == pytest.approx(7 / 8 * 8)
    assert cost.ring_time("reduce-scatter", s, n, bw) == pytest.approx(7 / 8 * 8)
    assert cost.ring_time("collective-permute", s, n, bw) == pytest.approx(8)
    assert cost.ring_time("all-reduce", s, 1, bw) == 0
    assert cost.ring_time("all-gather", 0, n, bw, latency=1e-3) == 0
    assert cost.ring_time("all-gather", 1, 4, 1e30, latency=1e-3) == pytest.approx(3e-3)


def test_fast_link_only_inside_a_node():
    h100 = cost.get_hardware("h100")
    assert cost.within_node(range(8), 8) and not cost.within_node(range(4, 12), 8)
    inside = cost.collective_time("all-reduce", 1e9, 8, tuple(range(8)), h100)
    across = cost.collective_time("all-reduce", 1e9, 8, tuple(range(0, 64, 8)), h100)
    assert across / inside == pytest.approx(h100.intra_bw / h100.inter_bw, rel=0.01)


def test_overlap_hides_fsdp_traffic_but_not_tensor_traffic():
    h100 = cost.get_hardware("h100")
    fsdp = cost.CommItem("all-gather", 1e9, 1, 8, tuple(range(8)), ("fsdp",))
    tp = cost.CommItem("all-reduce", 1e9, 1, 8, tuple(range(8)), ("tensor",))
    flops = 10 * h100.peak_flops  # 10 s of compute hides any of it
    hidden = cost.predict(h100, flops, 0, [fsdp], 1.0, 1, 8)
    exposed = cost.predict(h100, flops, 0, [tp], 1.0, 1, 8)
    assert hidden.step_time_s == pytest.approx(10) and hidden.exposed_comm_s == 0
    assert exposed.step_time_s == pytest.approx(10 + tp.time(h100))
    # MFU = model FLOPs / (step * peak * devices)
    p = cost.predict(h100, h100.peak_flops, 0, [], 4 * h100.peak_flops, 1, 8)
    assert p.mfu == pytest.approx(0.5)


def test_model_flops_convention_counts_gqa_and_causal_attention():
    cfg = spmd.get_model("llama-70b").cfg  # 64 query heads, 8 kv heads
    d, k, f = cfg.d_model, cfg.head_dim, cfg.d_ff
    layer = 2 * d * 64 * k + 2 * d * 8 * k + 3 * d * f
    assert cost.matmul_params(cfg) == cfg.n_layers * layer + d * cfg.vocab_size
    seq = 4096
    causal = cost.model_flops_per_token(cfg, seq)
    full = cost.model_flops_per_token(cfg, seq, causal=False)
    assert full - causal == pytest.approx(12 * cfg.n_layers * 64 * k * seq / 2)
    assert causal == pytest.approx(6 * cost.matmul_params(cfg) + 6 * cfg.n_layers * 64 * k * seq)


BATCH, SEQ = 4, 32


@pytest.fixture(scope="module")
def tiny_stats():
    """gpt-tiny on one device, layers scanned and unrolled (two compiles for the module)."""
    layout = spmd.Layout.make("data=1", devices=jax.devices()[:1])
    out = {}
    for name, unroll in (("scanned", 1), ("unrolled", 2)):
        model = spmd.get_model("gpt-tiny", {"n_layers": 2, "scan_unroll": unroll})
        program = TrainProgram.for_tokens(model, layout, BATCH, SEQ)
        out[name] = (model, report.compile_stats(program))
    return out


def test_analytic_flops_match_xla_float32_cpu(tiny_stats):
    """XLA's count of the compiled float32 program (one device, layers unrolled so no loop
    hides iterations) against the analytic count of what spmd computes (non-causal)."""
    model, stats = tiny_stats["unrolled"]
    analytic = cost.model_flops_per_step(model, BATCH, SEQ, causal=False)
    assert stats.flops_per_device == stats.xla_flops_raw  # no loops: nothing added
    # The program's matmuls are exactly the convention's count of what spmd computes...
    assert stats.matmul_flops_per_device == pytest.approx(analytic, rel=0.01)
    # ...and XLA's total adds the elementwise work (norms, softmax, Adam): a few percent.
    assert 1.0 <= stats.xla_flops_raw / analytic < 1.15
    # MFU's causal count drops half the attention term; it is never above the hardware's.
    causal = cost.model_flops_per_step(model, BATCH, SEQ)
    attention = 12 * model.cfg.n_layers * model.cfg.n_heads * model.cfg.head_dim * SEQ
    assert analytic - causal == pytest.approx(BATCH * SEQ * attention / 2)
    assert (
        6 * param_lib.count(model.specs()) * BATCH * SEQ > causal
    )  # the embedding is not a matmul


def test_loop_bodies_are_counted_per_iteration(tiny_stats):
    """The scanned program's corrected count equals the unrolled program's XLA count."""
    scanned, unrolled = tiny_stats["scanned"][1], tiny_stats["unrolled"][1]
    assert scanned.xla_flops_raw < 0.8 * unrolled.xla_flops_raw  # XLA: the body once
    assert scanned.flops_per_device == pytest.approx(unrolled.flops_per_device, rel=0.03)
    assert scanned.matmul_flops_per_device == pytest.approx(unrolled.matmul_flops_per_device)
