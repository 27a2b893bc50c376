"""experiments/scaling.py, run tiny: a one-layer, 64-wide gpt-tiny on 1 and 2 devices."""

import json

import pytest

from experiments import scaling


def test_points_strong_fixed_global_weak_fixed_per_device():
    pts = scaling.points([1, 2, 4], batch=8, per_device_batch=2)
    assert [(p["mode"], p["devices"], p["batch"]) for p in pts] == [
        ("strong", 1, 8), ("strong", 2, 8), ("strong", 4, 8),
        ("weak", 1, 2), ("weak", 2, 4), ("weak", 4, 8),
    ]  # fmt: skip


@pytest.mark.slow  # three compiles: about 20 s on an idle 2-core machine, 40 s on a busy one
def test_runs_and_writes_results(tmp_path):
    out = scaling.main(
        ["--model", "gpt-tiny", "--set", "n_layers=1,d_model=64", "--devices-list", "1,2",
         "--batch", "4", "--per-device-batch", "2", "--seq", "16", "--rounds", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    rows = {(r["mode"], r["devices"]): r for r in out["rows"]}
    assert set(rows) == {("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)}
    for r in rows.values():
        assert r["measured_s"] > 0 and r["measured_median_s"] > 0 and r["predicted_s"] > 0
        assert r["mesh"] == f"fsdp={r['devices']}"
        assert r["measured_tokens_per_s"] > 0
    assert rows[("strong", 2)]["batch"] == rows[("strong", 1)]["batch"] == 4
    assert rows[("weak", 2)]["batch"] == 2 * rows[("weak", 1)]["batch"] == 4
    for mode in scaling.MODES:
        one, two = rows[(mode, 1)], rows[(mode, 2)]
        assert one["collective_bytes"] == 0 and one["collective_count"] == 0
        assert two["collective_bytes"] > 0 and two["all-gather_bytes"] > 0
        assert one["ring_bytes"] == 0 and 0 < two["ring_bytes"] < two["collective_bytes"]
        assert two["state_bytes"] < one["state_bytes"]  # FSDP shards params and optimizer
        assert one["measured_vs_first"] == one["predicted_vs_first"] == 1
    md = (tmp_path / "scaling.md").read_text()
    assert "## Strong scaling" in md and "## Weak scaling" in md
    assert "| 2 | `fsdp=2`" in md and "no speedup is expected" in md
    assert "python -m experiments.scaling --model gpt-tiny" in md
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert len(saved["rows"]) == 4 and saved["args"]["devices_list"] == "1,2"
