"""The serving benchmark runs end to end on a tiny model, and its figures add up."""

import json

import pytest

from experiments import inference
from spmd import params as param_lib
from spmd.models import get_model


def test_bench_reports_throughput_and_bandwidth(tmp_path, capsys):
    out = tmp_path / "inference.json"
    argv = ["--model", "gpt-tiny", "--set", "n_layers=1", "--batches", "1,2", "--prompt-len",
            "5", "--new-tokens", "4", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert inference.main(argv) == 0
    printed = capsys.readouterr().out
    assert "decode tok/s" in printed and str(out) in printed

    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert saved["config"]["model"] == "gpt-tiny"
    model = get_model("gpt-tiny", {"n_layers": 1})
    for r in rows:
        assert r["new_tokens"] == 4
        assert r["param_bytes"] == param_lib.nbytes(model.specs())
        # K and V, 1 layer, 4 kv heads, 16 + 4 - 1 slots (prompts pad to 16), 16 dims, 4 bytes.
        assert r["kv_bytes_per_step"] == 2 * 1 * r["batch"] * 4 * 19 * 16 * 4
        step_s = r["decode_s"] / 3  # the first of the 4 ids comes from the prefill
        assert r["decode_step_ms"] == pytest.approx(1e3 * step_s)
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 3 / r["decode_s"])
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch"] * 5 / r["prefill_s"])
        expected_gb_s = (r["param_bytes"] + r["kv_bytes_per_step"]) / step_s / 1e9
        assert r["bandwidth_gb_s"] == pytest.approx(expected_gb_s)
        assert r["decode_s"] > 0 and r["prefill_s"] > 0


def test_bench_bad_model_is_one_line(capsys):
    assert inference.main(["--model", "nope", "--out", "/dev/null"]) == 2
    assert capsys.readouterr().err.startswith("spmd: error: unknown model 'nope'")
