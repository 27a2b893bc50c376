from conftest import run_spmd


def test_train_runs_and_writes_metrics(tmp_path):
    metrics = tmp_path / "m.jsonl"
    out = run_spmd("train", "--model", "gpt-tiny", "--devices", "2", "--mesh", "fsdp=2",
                   "--steps", "3", "--batch", "4", "--seq", "32", "--no-progress",
                   "--metrics-file", str(metrics))
    assert out.returncode == 0, out.stderr
    rows = metrics.read_text().splitlines()
    assert len(rows) == 3
