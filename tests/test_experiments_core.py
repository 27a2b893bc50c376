"""The core experiments run, tiny, and show what they claim."""

from experiments import compile_time, seed_mirrored


def test_seed_mirrored_matches_one_device_at_float32_rounding():
    result = seed_mirrored.run(epochs=2, verbose=False)
    assert result["losses"][1] < result["losses"][0]  # it trains
    assert result["loss_diff"] < 1e-6
    assert result["param_diff"] / result["param_scale"] < 1e-5


def test_compile_time_experiment_runs(capsys):
    rows = compile_time.main(
        ["--model", "gpt-tiny", "--layers", "1", "2", "--no-unrolled", "--mesh", "fsdp=8"]
    )
    assert [r["layers"] for r in rows] == [1, 2]
    assert all(r["scan_s"] > 0 for r in rows)
    assert "compile seconds" in capsys.readouterr().out


def test_attention_benchmark_times_every_cpu_implementation(tmp_path, capsys):
    from experiments import attention

    out = tmp_path / "attention.json"
    result = attention.main(["--shape", "1,32,4,2,8", "--rounds", "2", "--out", str(out)])
    assert set(result["median_s"]) == {"einsum", "xla", "blocked"}
    assert result["fastest"] in result["median_s"] and out.is_file()
    assert "the fastest" in capsys.readouterr().out
