"""experiments/strategies.py, constructed cheaply: two layouts of a one-layer gpt-tiny."""

import json

from experiments import strategies


def test_spearman():
    assert strategies.spearman([1, 2, 3], [10, 20, 30]) == 1
    assert strategies.spearman([1, 2, 3], [3, 2, 1]) == -1


def test_runs_and_writes_results(tmp_path):
    out = strategies.main(
        ["--model", "gpt-tiny", "--set", "n_layers=1", "--batch", "8", "--seq", "16",
         "--rounds", "1", "--layouts", "dp,fsdp", "--out", str(tmp_path)]
    )  # fmt: skip
    rows = {r["layout"]: r for r in out["rows"]}
    assert set(rows) == {"dp", "fsdp"}
    assert rows["fsdp"]["all-gather_bytes"] > 0 and rows["dp"]["all-gather_bytes"] == 0
    assert rows["fsdp"]["state_bytes"] < rows["dp"]["state_bytes"]
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in rows.values())
    md = (tmp_path / "strategies.md").read_text()
    assert "| dp | `data=8`" in md and "Spearman" in md
    assert (tmp_path / "strategies.png").stat().st_size > 1000
    assert json.loads((tmp_path / "strategies.json").read_text())["rows"]
