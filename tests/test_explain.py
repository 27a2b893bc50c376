"""The compiler report (`spmd explain`) on gpt-tiny over 8 simulated devices."""

import json

import pytest
from conftest import run_spmd

import spmd
from spmd import params as param_lib
from spmd.compiler import render, report

OVERRIDES = {"n_layers": 2}
BATCH, SEQ = 8, 32
LAYOUTS = {"dp": "data=8", "fsdp": "fsdp=8", "tp": "data=2,tensor=4"}


@pytest.fixture(scope="module")
def reports():
    """One compile per layout, shared by the module's tests."""
    return {
        name: report.explain(
            "gpt-tiny", mesh, batch=BATCH, seq=SEQ, hardware="h100", overrides=OVERRIDES
        )
        for name, mesh in LAYOUTS.items()
    }


def by_kind(rep, kind):
    return [c for c in rep.stats.collectives if c.kind == kind]


def test_dp_all_reduces_four_bytes_per_parameter_over_data(reports):
    rep = reports["dp"]
    assert by_kind(rep, "all-gather") == [] and by_kind(rep, "reduce-scatter") == []
    over_data = sum(c.total_bytes for c in by_kind(rep, "all-reduce") if c.axes == ("data",))
    assert over_data == pytest.approx(4 * rep.params, rel=0.01)  # float32 gradients
    assert all(c.axes == ("data",) for c in rep.stats.collectives)


def test_fsdp_shards_state_and_gathers_over_fsdp(reports):
    rep, n = reports["fsdp"], 8
    mem = rep.stats.memory
    total_params = param_lib.nbytes(spmd.get_model("gpt-tiny", OVERRIDES).specs())
    assert mem["params_bytes"] == pytest.approx(total_params / n, rel=0.05)
    assert mem["opt_state_bytes"] == pytest.approx(2 * total_params / n, rel=0.05)
    gathers = by_kind(rep, "all-gather")
    assert gathers and all(c.axes == ("fsdp",) for c in gathers)
    # Each layer weight is gathered in the forward scan and again in the backward scan; the
    # embedding table and the head (outside the scans) are gathered once.
    specs = spmd.get_model("gpt-tiny", OVERRIDES).specs()
    layers = param_lib.nbytes({k: v for k, v in specs["layers"].items() if "norm" not in k})
    once = param_lib.nbytes(specs["embed"]) + param_lib.nbytes(specs["head"])
    assert sum(c.total_bytes for c in gathers) == pytest.approx(2 * layers + once, rel=0.02)
    scatters = by_kind(rep, "reduce-scatter")
    assert scatters and all(c.axes == ("fsdp",) for c in scatters)
    assert {c.raw_kind for c in scatters} == {"all-reduce"}  # XLA:CPU's all-reduce + slice
    # DP holds the whole state on every device.
    dp = reports["dp"].stats.memory
    assert dp["params_bytes"] + dp["opt_state_bytes"] > 7 * (
        mem["params_bytes"] + mem["opt_state_bytes"]
    )


def test_tp_all_reduces_activations_over_tensor_and_gathers_no_weight(reports):
    rep = reports["tp"]
    cfg = spmd.get_model("gpt-tiny", OVERRIDES).cfg
    tensor = [c for c in by_kind(rep, "all-reduce") if c.axes == ("tensor",)]
    activation = BATCH // 2 * SEQ * cfg.d_model * 4  # (b/data, t, d) float32
    # Two per layer forward (attention out, MLP down), and more backward, where XLA
    # combines some into one tuple all-reduce.
    acts = [c for c in tensor if c.bytes % activation == 0]
    assert sum(c.total_bytes for c in acts) >= 4 * cfg.n_layers * activation
    # The only gather is the embedding table, which gpt.embed gathers whole for the lookup;
    # no layer weight is ever gathered.
    (table,) = by_kind(rep, "all-gather")
    assert (table.bytes, table.count, table.axes) == (
        cfg.vocab_size * cfg.d_model * 4,
        1,
        ("tensor",),
    )


def test_json_contract(reports):
    out = json.loads(report.dumps(reports["fsdp"]))
    assert out["params"] == reports["fsdp"].params
    assert out["mesh"] == {
        "data": 1,
        "stage": 1,
        "fsdp": 8,
        "sequence": 1,
        "expert": 1,
        "tensor": 1,
    }
    for key in ("arguments_bytes", "temp_bytes", "output_bytes", "total_bytes"):
        assert out["memory"][key] >= 0
    assert out["flops_per_device"] > 0 and out["model_flops_per_step"] > 0
    assert out["collectives"] and all(
        {"kind", "count", "bytes", "axes"} <= set(c) for c in out["collectives"]
    )
    assert {"step_time_s", "tokens_per_s", "mfu"} <= set(out["predicted"])
    assert 0 < out["predicted"]["mfu"] < 1


def test_text_report(reports):
    text = render.render_text(reports["fsdp"])
    for needle in ("mesh      fsdp=8", "layers/w_gate", "P(None, 'fsdp', None)", "fits",
                   "reduce-scatter", "predicted on h100 (bfloat16 peak 989 TFLOP/s)"):  # fmt: skip
        assert needle in text, needle
    p = reports["fsdp"].prediction
    assert (
        f"predicted MFU {p.mfu:.1%} (at 84% matmul efficiency; ≤ {p.mfu_at_peak:.1%} at peak)"
        in text
    )
    assert p.mfu <= p.mfu_at_peak  # equal when communication hides all compute


def test_float32_on_a_bf16_profile_warns_once_with_the_prediction(capsys):
    from spmd.cli import main

    argv = ["explain", "--model", "gpt-tiny", "--set", "n_layers=1", "--devices", "8",
            "--batch", "8", "--seq", "16", "--hardware", "h100"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.err.strip().splitlines() == [
        "spmd: warning: the h100 profile has only a bfloat16 peak: this float32 step's time "
        "and MFU are predicted as if it computed in bfloat16; use --dtype bfloat16 for a "
        "prediction that holds"
    ]
    assert "predicted on h100 (bfloat16 peak" in out.out
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().err == ""


def test_dtype_warning_only_when_the_peak_is_for_another_dtype():
    from spmd.compiler import cost

    assert cost.dtype_warning(cost.get_hardware("cpu"), "float32") is None
    assert "cpu profile has only a float32 peak" in cost.dtype_warning(
        cost.get_hardware("cpu"), "bfloat16"
    )
    for name in ("a100", "h100", "h200", "tpu-v4", "tpu-v5e", "tpu-v5p"):
        hw = cost.get_hardware(name)
        assert cost.dtype_warning(hw, "bfloat16") is None
        assert "use --dtype bfloat16" in cost.dtype_warning(hw, "float32")


def test_cli_json_and_bad_input():
    out = run_spmd(
        "explain",
        "--model",
        "gpt-tiny",
        "--set",
        "n_layers=1",
        "--devices",
        "4",
        "--mesh",
        "fsdp=2,tensor=2",
        "--batch",
        "4",
        "--seq",
        "16",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["mesh"]["fsdp"] == 2 and data["memory"]["total_bytes"] > 0
    for args, needle in (
        (["--hardware", "b200"], "unknown hardware 'b200'"),
        (["--devices", "8", "--mesh", "fsdp=3"], "fsdp=3 has 3 devices but 8 are available"),
    ):
        bad = run_spmd("explain", "--model", "gpt-tiny", *args)
        assert bad.returncode == 2, bad.stderr
        assert needle in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
