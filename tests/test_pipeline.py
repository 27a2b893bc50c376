"""Pipeline parallelism over `stage`: every schedule trains exactly like one device.

A tiny gpt (8 layers, so interleaved has two chunks per stage even on 4 stages) trains a
few steps on fixed batches; per-step losses and final parameters must match the
single-device run within 1e-5 relative. Compiled programs and runs are cached per module,
so the memory, explain and checkpoint tests reuse the parity runs' compiles.
"""

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest

import spmd
from spmd import checkpoint as ckpt
from spmd.cli import main
from spmd.compiler import cost, render, report
from spmd.compiler.program import TrainProgram
from spmd.errors import SpmdError
from spmd.models import get_model
from spmd.parallel.pipeline import PipelineConfig
from spmd.train import optim

BATCH, SEQ, STEPS = 32, 32, 3
FIELDS = dict(n_layers=8, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, vocab_size=256)
# eps=1e-6 for the reason tests/test_parity.py gives: Adam's gain on near-zero gradients.
OPTIM = optim.OptimConfig(lr=3e-3, warmup_steps=1, total_steps=STEPS, eps=1e-6)
MESHES = [("stage=2,fsdp=4", 8), ("stage=4,data=2", 8)]
SCHEDULES = ["gpipe", "1f1b", "interleaved"]


@dataclasses.dataclass
class Run:
    program: TrainProgram
    compiled: object
    losses: np.ndarray
    params: dict


def batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (STEPS, BATCH, SEQ + 1)).astype(np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def program(mesh, devices, schedule=None, m=None, remat="none", grad_accum=1, extra=(), opt=OPTIM):
    layout = spmd.Layout.make(mesh, devices=jax.devices()[:devices])
    model = get_model("gpt-tiny", {**FIELDS, "remat": remat, **dict(extra)})
    pipe = None
    if schedule:
        pipe = PipelineConfig(schedule, m, 2 if schedule == "interleaved" else 1)
    return TrainProgram.for_tokens(
        model, layout, BATCH, SEQ, grad_accum=grad_accum, optimizer=opt, pipeline=pipe
    )


def steps(prog, compiled, state, batch_list):
    losses = []
    for batch in batch_list:
        batch = {k: jax.device_put(v, prog.batch_shardings[k]) for k, v in batch.items()}
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@functools.cache
def run(mesh, devices, schedule=None, m=None, remat="none", grad_accum=1, extra=(), opt=OPTIM):
    prog = program(mesh, devices, schedule, m, remat, grad_accum, extra, opt)
    compiled = prog.compile()
    state, losses = steps(prog, compiled, prog.init_state(jax.random.key(0)), batches())
    return Run(prog, compiled, np.array(losses), jax.device_get(state.params))


def reference() -> Run:
    return run("data=1", 1)


def assert_parity(got: Run, want: Run):
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5, atol=0)
    for path, a in jax.tree_util.tree_leaves_with_path(got.params):
        b = functools.reduce(lambda t, k: t[k.key], path, want.params)
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)  # per tensor: entries near 0 blow up
        assert rel < 1e-5, f"{jax.tree_util.keystr(path)}: relative difference {rel:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("m", [4, 8])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("mesh, devices", MESHES)
def test_every_schedule_matches_one_device(mesh, devices, schedule, m):
    assert_parity(run(mesh, devices, schedule, m), reference())


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh, schedule, m, remat, grad_accum",
    [
        ("stage=2,fsdp=4", "1f1b", 4, "full", 1),  # remat inside the recomputed stage
        ("stage=4,data=2", "gpipe", 4, "none", 2),  # a pipeline per accumulation step
        ("stage=2,fsdp=2,tensor=2", "interleaved", 4, "none", 1),  # tensor inside a stage
    ],
)
def test_pipeline_composes(mesh, schedule, m, remat, grad_accum):
    assert_parity(run(mesh, 8, schedule, m, remat, grad_accum), reference())


BF16 = (("compute_dtype", "bfloat16"), ("loss_chunks", 2))
SGD = dataclasses.replace(OPTIM, name="sgd", lr=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bfloat16_pipelines_over_data_match_one_device(schedule):
    """bfloat16 compute with `data` manual beside `stage` (the planner's llama-70b pick):
    every tick's gradients are summed, and reduced over `data`, in float32. Summed in
    bfloat16, XLA:CPU aborted on the psum; a chunked loss inside 1F1B's shard_map failed to
    trace. Each run rounds every gradient entry to bfloat16 (2^-8 relative) in its own
    place, so the SGD updates (Adam would amplify near-zero gradients) agree to about 1%:
    0.2-0.9% per tensor measured."""
    got = run("stage=2,data=2,fsdp=2", 8, schedule, 4, extra=BF16, opt=SGD)
    want = run("data=1", 1, extra=BF16, opt=SGD)
    init = jax.device_get(want.program.init_state(jax.random.key(0)).params)
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-4, atol=0)
    for path, a in jax.tree_util.tree_leaves_with_path(got.params):
        b, p0 = (
            functools.reduce(lambda t, k: t[k.key], path, tree) for tree in (want.params, init)
        )
        rel = np.linalg.norm(a - b) / np.linalg.norm(b - p0)
        assert rel < 2e-2, f"{jax.tree_util.keystr(path)}: update differs by {rel:.2e}"


def temp_bytes(r: Run) -> int:
    return r.compiled.executable.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_1f1b_holds_less_than_gpipe():
    """M=8 on 4 stages: GPipe's autodiff keeps every tick's residuals, 1F1B at most 2S-1
    stashed stage inputs and one tick's residuals."""
    gpipe = temp_bytes(run("stage=4,data=2", 8, "gpipe", 8))
    one_f_one_b = temp_bytes(run("stage=4,data=2", 8, "1f1b", 8))
    assert one_f_one_b < 0.5 * gpipe, (one_f_one_b, gpipe)


@pytest.mark.slow
def test_explain_shows_the_stage_permutes_and_the_bubble():
    r = run("stage=4,data=2", 8, "1f1b", 8)
    rep = report.make_report(
        r.program, cost.get_hardware("cpu"), report.stats_from_compiled(r.compiled)
    )
    kinds = {(g["kind"], tuple(g["axes"])) for g in rep.collective_groups()}
    assert ("collective-permute", ("stage",)) in kinds
    assert rep.pipeline["bubble"] == pytest.approx(3 / 11)  # (S-1)/(M+S-1)
    assert rep.to_json()["pipeline"]["schedule"] == "1f1b"
    assert "bubble 27.3% = (4-1)/(8+4-1)" in render.render_text(rep)


def test_bubble_formula():
    assert PipelineConfig("gpipe", 4).bubble(4) == pytest.approx(3 / 7)
    assert PipelineConfig("1f1b", 16).bubble(4) == pytest.approx(3 / 19)
    assert PipelineConfig("interleaved", 4, 2).bubble(4) == pytest.approx(3 / 11)


@pytest.mark.slow
def test_checkpoint_resumes_exactly_and_crosses_to_a_mesh_without_stage(tmp_path):
    """Save after one pipelined step, restore onto data=8 (no stage), save from there,
    restore onto the pipeline again: the next steps' losses equal the uninterrupted run."""
    r = run("stage=4,data=2", 8, "1f1b", 4)
    first, rest = batches()[:1], batches()[1:]
    state, _ = steps(r.program, r.compiled, r.program.init_state(jax.random.key(0)), first)
    saved = jax.device_get(state.params)
    _save(str(tmp_path / "a"), state)
    flat = program("data=8", 8)
    _, on_data, *_ = ckpt.restore_train_state(str(tmp_path / "a"), flat.abstract_state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(on_data.params), saved)
    _save(str(tmp_path / "b"), on_data)
    _, back, *_ = ckpt.restore_train_state(str(tmp_path / "b"), r.program.abstract_state)
    _, losses = steps(r.program, r.compiled, back, rest)
    np.testing.assert_array_equal(losses, r.losses[1:])


def _save(directory, state):
    saver = ckpt.Checkpointer(directory, every=1, keep=1, async_save=False)
    saver.save(1, state, {"loader": {}, "rng": [0, 1]}, {})
    saver.wait()
    saver.close()


@pytest.mark.parametrize(
    "mesh, pipe, message",
    [
        ("stage=3", None, "n_layers=8 is not divisible by stage=3"),
        ("stage=4", PipelineConfig("1f1b", 2), "--microbatches=2 must be at least stage=4"),
        ("stage=2,fsdp=4", PipelineConfig("gpipe", 3), "is not divisible by --microbatches=3"),
        ("stage=2,fsdp=4", PipelineConfig("gpipe", 16), "microbatch=2 (--microbatches=16)"),
        ("stage=4", PipelineConfig("interleaved", 4, 4), "--virtual-stages=4 does not divide"),
        ("data=8", PipelineConfig("1f1b", 4), "need a mesh with stage>1"),
    ],
)
def test_bad_pipelines_are_refused_before_compiling(mesh, pipe, message):
    layout = spmd.Layout.make(mesh, devices=jax.devices()[: layout_devices(mesh)])
    with pytest.raises(SpmdError, match=re.escape(message)):
        TrainProgram.for_tokens(get_model("gpt-tiny", FIELDS), layout, BATCH, SEQ, pipeline=pipe)


def layout_devices(mesh: str) -> int:
    return int(np.prod([int(p.split("=")[1]) for p in mesh.split(",")]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mesh", "stage=2,data=4", "--virtual-stages", "2"], "needs --pipeline-schedule inte"),
        (["--mesh", "stage=2,data=4", "--pipeline-schedule", "zigzag"], "must be one of gpipe"),
        (["--mesh", "data=8", "--microbatches", "4"], "need a mesh with stage>1"),
        (["--mesh", "stage=4,data=2", "--set", "n_layers=6"], "n_layers=6 is not divisible by"),
        (
            ["--mesh", "stage=2,data=4", "--pipeline-schedule", "1f1b", "--microbatches", "1"],
            "--microbatches=1 must be at least stage=2 under 1f1b",
        ),
        (
            ["--mesh", "stage=2,data=4", "--pipeline-schedule", "interleaved"],
            "--virtual-stages=2 does not divide the 1 layers per stage",
        ),
    ],
)
def test_train_flags_fail_in_one_line(capsys, tmp_path, extra, message):
    data = tmp_path / "tiny.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    argv = ["train", "--steps", "1", "--no-progress", "--data", str(data), "--seq", "16"]
    if "--set" not in extra:
        argv += ["--set", "n_layers=2"]
    assert main([*argv, *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
