"""Local SGD / DiLoCo over `data` (spmd.parallel.local_sgd): parity, communication, resume."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import jsonl_corpus, run_spmd

import spmd
from spmd.cli import main
from spmd.compiler import cost, hlo
from spmd.compiler.program import TrainProgram
from spmd.models import get_model
from spmd.parallel.local_sgd import LocalSGDConfig
from spmd.train import optim

BATCH, SEQ = 16, 32
TINY = {"n_layers": 2, "d_model": 32}


def fixed_batches(steps: int):
    rng = np.random.default_rng(0)
    # 16 of the 384 token ids: a unigram to learn, so a few steps move the loss clearly.
    tokens = rng.integers(0, 16, (steps, BATCH, SEQ + 1)).astype(np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def program(mesh: str, n_devices: int, opt: optim.OptimConfig, local=None) -> TrainProgram:
    layout = spmd.Layout.make(mesh, devices=jax.devices()[:n_devices])
    return TrainProgram.for_tokens(
        get_model("gpt-tiny", TINY), layout, BATCH, SEQ, optimizer=opt, local=local
    )


def train(prog: TrainProgram, steps: int, compiled=None, sync_every=None):
    """Losses and final parameters. `sync_every` runs a local-SGD program's two executables
    on that schedule directly (they are the same programs for every H)."""
    step = compiled or prog.compile()
    state = prog.init_state(jax.random.key(0))
    losses = []
    for n, batch in enumerate(fixed_batches(steps), start=1):
        batch = {k: jax.device_put(v, prog.batch_shardings[k]) for k, v in batch.items()}
        if sync_every:
            exe = step.sync if n % sync_every == 0 else step.executable
            state, metrics = exe(state, batch)
        else:
            state, metrics = step(state, batch, n)
        losses.append(float(np.mean(jax.device_get(metrics["loss"]))))  # per worker under local
    return np.array(losses), jax.device_get(state.params)


def assert_close_trees(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.abs(y).max()))


@pytest.mark.slow
def test_h1_plain_averaging_is_synchronous_data_parallel_sgd():
    """The exact equivalence: with inner SGD (no clipping, no weight decay, no momentum),
    worker w steps p_w = p - lr*g_w from the shared p on its half of the batch. `avg` with
    outer lr 1 then sets p <- p - mean_w(p - p_w) = p - lr*mean_w(g_w), and since the loss is
    the mean over equally many tokens per worker, mean_w(g_w) is the whole batch's gradient:
    one step of synchronous data-parallel SGD. (With AdamW it is not: the average of Adam
    steps is not Adam's step on the averaged gradient.) Equal up to float32 rounding."""
    opt = optim.OptimConfig(lr=2.0, warmup_steps=0, total_steps=4, name="sgd")
    sync_losses, sync_params = train(program("data=2", 2, opt), 4)
    local = LocalSGDConfig(1, outer_optimizer="avg", outer_lr=1.0)
    local_losses, local_params = train(program("data=2", 2, opt, local), 4)
    assert sync_losses[-1] < sync_losses[0] - 0.05  # it trains, so the comparison means something
    np.testing.assert_allclose(local_losses, sync_losses, rtol=1e-5)
    assert_close_trees(local_params, sync_params, 1e-5)


@pytest.fixture(scope="module")
def diloco_h8():
    """DiLoCo (inner AdamW, outer Nesterov) on data=2,fsdp=2, compiled once."""
    opt = optim.OptimConfig(lr=3e-3, warmup_steps=1, total_steps=8, eps=1e-6)
    prog = program("data=2,fsdp=2", 4, opt, LocalSGDConfig(8))
    return prog, prog.compile(), opt


def test_the_inner_step_has_no_collective_over_data(diloco_h8):
    prog, compiled, _ = diloco_h8
    inner = hlo.collectives(compiled.executable.as_text(), prog.layout.shape)
    sync = hlo.collectives(compiled.sync.as_text(), prog.layout.shape)
    assert inner and all("data" not in c.axes for c in inner)  # fsdp still gathers inside
    over_data = [c for c in sync if "data" in c.axes]
    assert {c.kind for c in over_data} == {"all-reduce"}
    # The sync averages one fsdp shard of the parameters (float32) over data, nothing more.
    n_params = prog.model.n_params
    assert hlo.bytes_over(sync, ("data",)) == pytest.approx(4 * n_params / 2, rel=0.01)


@pytest.mark.slow
def test_sharded_local_sgd_matches_unsharded(diloco_h8):
    """Inside a worker, fsdp works as usual: data=2,fsdp=2 trains like data=2, across two
    syncs of DiLoCo at H=4 (eps as in test_parity, for the same reason)."""
    prog, compiled, opt = diloco_h8
    sharded = train(prog, 8, compiled, sync_every=4)
    plain = train(program("data=2", 2, opt, LocalSGDConfig(4)), 8)
    assert plain[0][-1] < plain[0][0]
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-5)
    assert_close_trees(sharded[1], plain[1], 1e-5)


def test_explain_reports_bytes_over_data_amortised(diloco_h8):
    from spmd.compiler import render, report

    prog, compiled, _ = diloco_h8
    ls = report.local_sgd_comm(compiled)
    assert ls["inner_step_bytes"] == 0 and ls["sync_step_bytes"] > 0
    assert ls["bytes_per_step"] == pytest.approx(ls["sync_step_bytes"] / 8)
    rep = report.make_report(prog, cost.get_hardware("cpu"), report.stats_from_compiled(compiled))
    rep.local_sgd = ls
    assert json.loads(report.dumps(rep))["local_sgd"]["local_steps"] == 8
    assert "amortised over 8 steps" in render.render_text(rep)


# --- the CLI: resume and bad input ---------------------------------------------------------


def cli_args(data, ckpt, metrics, steps, *extra):
    return ["train", "--devices", "8", "--mesh", "data=2,fsdp=4", "--set", "n_layers=2,d_model=32",
            "--batch", "8", "--seq", "32", "--lr", "3e-3", "--warmup", "2", "--data", data,
            "--no-progress", "--local-steps", "2", "--steps", str(steps), "--schedule-steps", "6",
            "--ckpt-dir", ckpt, "--metrics-file", metrics, *extra]  # fmt: skip


def losses(path) -> dict[int, float]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_a_stopped_run_resumes_exactly_mid_cycle(tmp_path, env):
    """Stopped at step 3 of H=2 (a worker copy has diverged from the global parameters), the
    resumed run's losses equal the uninterrupted run's: the checkpoint holds the global and
    per-worker parameters, the inner AdamW states and the outer momentum."""
    data = jsonl_corpus(tmp_path / "docs.jsonl")
    whole, part1, part2 = (str(tmp_path / f"{n}.jsonl") for n in ("whole", "part1", "part2"))
    whole_run = run_spmd(*cli_args(data, str(tmp_path / "a"), whole, 6), env=env)
    assert whole_run.returncode == 0, whole_run.stderr
    b = str(tmp_path / "b")
    first = run_spmd(*cli_args(data, b, part1, 3), env=env)
    assert first.returncode == 0, first.stderr
    second = run_spmd(*cli_args(data, b, part2, 6, "--resume"), env=env)
    assert second.returncode == 0, second.stderr
    expected, got = losses(whole), {**losses(part1), **losses(part2)}
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_array_equal([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)])
    # The worker states are stacked per data slice: another number of workers is refused.
    other = cli_args(data, b, part2, 8, "--resume", "--mesh", "data=4,fsdp=2")
    refused = run_spmd(*other, env=env)
    assert refused.returncode == 2 and "which has data=2" in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mesh", "fsdp=8", "--local-steps", "4"], "--local-steps needs data > 1"),
        (["--mesh", "data=8", "--local-steps", "0"], "--local-steps: 0 must be a positive"),
        (["--mesh", "data=8", "--local-steps", "2", "--outer-optimizer", "adam"], "invalid choice"),
        (["--mesh", "data=8", "--local-steps", "2", "--outer-momentum", "1.5"], "--outer-momentum"),
        (["--mesh", "data=8", "--local-steps", "2", "--outer-lr", "0"], "--outer-lr=0.0 must be"),
        (["--mesh", "data=8", "--optimizer", "lion"], "invalid choice: 'lion'"),
    ],
)
def test_bad_local_sgd_flags_fail_in_one_line(capsys, tmp_path, extra, message):
    data = jsonl_corpus(tmp_path / "docs.jsonl", docs=20)
    argv = ["train", "--steps", "1", "--no-progress", "--data", data, "--batch", "8",
            "--seq", "16", *extra]  # fmt: skip
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
def test_the_experiment_runs_at_a_toy_size(tmp_path):
    from experiments import local_sgd

    data = jsonl_corpus(tmp_path / "docs.jsonl")
    runs = local_sgd.main(["--model", "gpt-tiny", "--set", "n_layers=2,d_model=32", "--data", data,
                           "--steps", "4", "--batch", "8", "--seq", "32", "--warmup", "1",
                           "--local-steps", "2", "--eval-every", "2", "--eval-batches", "1",
                           "--out", str(tmp_path)])  # fmt: skip
    sync, local = runs
    assert sync["eval_steps"] == local["eval_steps"] == [2, 4]
    # H=2: half the steps send the parameter delta over data, the others nothing.
    assert 0 < local["bytes_per_step"] < 0.6 * sync["bytes_per_step"]
    assert local["eval_bytes"][1] == pytest.approx(2 * local["eval_bytes"][0])
    assert "DiLoCo H=2" in (tmp_path / "local_sgd.md").read_text()
    assert (tmp_path / "local_sgd.png").stat().st_size > 0
