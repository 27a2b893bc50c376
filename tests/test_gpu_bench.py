"""The GPU table's script runs its tiny cases on CPU, end to end, and records out-of-memory
cases as rows instead of crashing."""

import json

import jax
import pytest

from experiments import gpu
from spmd.compiler.program import TrainProgram


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]


def test_tiny_cases_measure_and_predict_in_fresh_processes(tmp_path, capsys):
    returned = gpu.main(["--tiny", "--steps", "2", "--out", str(tmp_path)])
    rows = rows_of(tmp_path)
    assert rows == returned
    assert [r["case"] for r in rows] == ["tiny-dots", "tiny-none"]
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["platform"] == "cpu" and r["jax"] == jax.__version__
        assert len(r["step_times_s"]) == 2 and r["step_s"] > 0
        assert r["predicted_step_s"] > 0 and 0 < r["predicted_mfu"]
        # One FLOPs convention: TFLOP/s and MFU both come from the model's FLOPs.
        assert r["tflops"] == pytest.approx(r["model_flops_per_step"] / r["step_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"])
        assert r["compiled_bytes"] > 0 and r["loss"] > 0
        # The step pulled in none of the optional heavy packages.
        assert r["heavy_modules"] == []

    md = (tmp_path / "gpu.md").read_text().splitlines()
    assert md[0].startswith("spmd's train step on one cpu (cpu), jax " + jax.__version__)
    assert "not GPU figures" in md[0]
    assert md[2].startswith("| case | batch | remat | step | TFLOP/s | MFU | peak memory")
    body = md[4:]
    assert [line.split(" | ")[0] for line in body] == ["| tiny-dots", "| tiny-none"]
    assert all(line.count("|") == len(gpu.COLUMNS) + 1 for line in body)
    assert all(" ms | " in line and "%" in line for line in body)
    assert "tiny-none" in capsys.readouterr().out


def test_program_over_the_memory_limit_is_recorded_not_run(tmp_path):
    argv = ["--tiny", "--cases", "tiny-none", "--memory-limit-gb", "0.000001", "--same-process",
            "--out", str(tmp_path)]  # fmt: skip
    (row,) = gpu.main(argv)
    assert row == rows_of(tmp_path)[0]
    assert row["status"] == "oom" and "step_s" not in row
    assert row["needs_bytes"] == row["compiled_bytes"] > 1000
    line = (tmp_path / "gpu.md").read_text().splitlines()[-1]
    assert f"out of memory: needs {gpu.gb(row['compiled_bytes'])}" in line


def test_xla_resource_exhausted_becomes_a_row(monkeypatch):
    def exhausted(self):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 136.00GiB."
        )

    monkeypatch.setattr(TrainProgram, "compile", exhausted)
    row = gpu.measure(gpu.ALL_CASES["tiny-dots"], steps=1)
    assert row["status"] == "oom" and row["needs_bytes"] == 136 * 2**30
    assert "RESOURCE_EXHAUSTED" in row["error"]
    assert gpu.table_row(row).startswith("| tiny-dots | 4 | dots | out of memory: needs 146 GB |")


def test_other_failures_are_not_called_out_of_memory(monkeypatch):
    def broken(self):
        raise ValueError("a bug, not memory")

    monkeypatch.setattr(TrainProgram, "compile", broken)
    with pytest.raises(ValueError, match="a bug"):
        gpu.measure(gpu.ALL_CASES["tiny-dots"], steps=1)


def test_oom_sizes_in_xla_messages():
    assert gpu.bytes_in_message("Out of memory allocating 146028888064 bytes.") == 146028888064
    assert gpu.bytes_in_message("failed to allocate 512.0MiB (x)") == 512 * 2**20
    assert gpu.bytes_in_message("RESOURCE_EXHAUSTED: no size here") is None


def test_default_cases_are_the_issues_table():
    args = gpu.parse_args([])
    assert args.steps == 8 and args.out == str(gpu.RESULTS)
    cases = gpu.select(args)
    assert [(c.model, c.batch, c.seq, c.remat, c.dtype) for c in cases] == [
        ("gpt-1b", 16, 2048, "dots", "bfloat16"),
        ("gpt-1b", 8, 2048, "none", "bfloat16"),
        ("llama-7b", 8, 2048, "dots", "bfloat16"),
        ("llama-7b", 8, 2048, "none", "bfloat16"),
        ("gpt-1b", 16, 2048, "dots", "bfloat16"),
        ("gpt-1b", 8, 2048, "attention", "bfloat16"),
    ]
    assert dict(cases[2].overrides) == {"n_layers": 8}
    assert dict(cases[4].overrides) == {"attention": "einsum"}  # the issue's baseline
    with pytest.raises(SystemExit, match="unknown case 'nope'"):
        gpu.select(gpu.parse_args(["--cases", "nope"]))
