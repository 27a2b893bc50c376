import json

from conftest import run_spmd


def test_train_runs_and_writes_metrics(tmp_path, env):
    # The same program as the bench-ckpt test's, so the shared compilation cache serves both.
    data = tmp_path / "d.txt"
    data.write_text("".join(f"line {i} of text\n" for i in range(3000)))
    metrics = tmp_path / "m.jsonl"
    out = run_spmd("train", "--model", "gpt-tiny", "--set", "n_layers=1,d_model=64",
                   "--devices", "2", "--mesh", "fsdp=2", "--steps", "6", "--batch", "4",
                   "--seq", "32", "--lr", "1e-3", "--data", str(data), "--no-progress",
                   "--metrics-file", str(metrics), env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "step_time_s", "tokens_per_s", "mfu", "grad_norm", "lr"):
        assert all(key in r for r in rows), key
    assert "done: 6 steps" in out.stdout
