"""Runs that stop and come back: SIGKILL, crashes mid-save, corrupt steps, another mesh.

Every run is a real `spmd train` subprocess. They share a JAX compilation cache, so only the
first run of each program pays for compiling it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import jsonl_corpus, run_spmd, spmd_env

from spmd import checkpoint as ckpt

pytestmark = pytest.mark.slow

STEPS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return jsonl_corpus(tmp_path_factory.mktemp("data") / "docs.jsonl")


def base_args(data, *extra):
    return [
        "train",
        "--devices",
        "8",
        "--set",
        "n_layers=2,d_model=64",
        "--batch",
        "8",
        "--seq",
        "32",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--data",
        data,
        "--no-progress",
        *extra,
    ]


def rows_of(path) -> dict[int, dict]:
    """step -> row (a line cut short by a kill is skipped)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        out[row["step"]] = row
    return out


def train(env, *args, expect=0, timeout=600):
    out = run_spmd(*args, env=env, timeout=timeout)
    assert out.returncode == expect, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out


def popen_train(env, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "spmd.cli", *args],
        env=spmd_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(proc, metrics, step, timeout=600):
    """Block until the run has logged `step` (no timing is asserted, this only waits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(metrics).is_file() and max(rows_of(metrics), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"step {step} never logged")


def assert_losses_match(a: dict, b: dict, steps, atol):
    got = np.array([b[s]["loss"] for s in steps])
    want = np.array([a[s]["loss"] for s in steps])
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, env, data):
    """The reference: 20 uninterrupted steps on fsdp=8, a checkpoint every 5 (keeps 3)."""
    root = tmp_path_factory.mktemp("a")
    out = train(
        env,
        *base_args(
            data,
            "--mesh",
            "fsdp=8",
            "--steps",
            str(STEPS),
            "--ckpt-dir",
            str(root / "ck"),
            "--ckpt-every",
            "5",
            "--metrics-file",
            str(root / "m.jsonl"),
            "--eval-every",
            "10",
            "--plot",
            str(root / "loss.png"),
            "--tensorboard",
            str(root / "tb"),
        ),
    )
    return root, rows_of(root / "m.jsonl"), out


def test_reference_run_logs_evals_plots_and_checkpoints(run_a):
    root, rows, out = run_a
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert {s for s, r in rows.items() if "eval_loss" in r} == {10, 20}
    assert {s for s, r in rows.items() if "ckpt_blocked_s" in r} == {5, 10, 15, 20}
    assert rows[STEPS]["loss"] < rows[1]["loss"]
    assert (root / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((root / "tb").glob("events.out.tfevents.*"))
    assert ckpt.all_steps(root / "ck") == [10, 15, 20]  # --keep 3
    assert "resume with: spmd train" in out.stdout and "--resume" in out.stdout


def test_exact_resume_after_sigkill(run_a, tmp_path, env, data):
    args = base_args(
        data,
        "--mesh",
        "fsdp=8",
        "--steps",
        str(STEPS),
        "--ckpt-dir",
        str(tmp_path / "ck"),
        "--ckpt-every",
        "5",
        "--metrics-file",
        str(tmp_path / "m.jsonl"),
    )
    proc = popen_train(env, *args)
    wait_for_step(proc, tmp_path / "m.jsonl", 12)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    out = train(env, *args, "--resume")
    assert "resumed from" in out.stdout
    b = rows_of(tmp_path / "m.jsonl")
    assert sorted(b) == list(range(1, STEPS + 1))
    assert_losses_match(run_a[1], b, range(13, STEPS + 1), atol=1e-6)


def test_crash_during_async_save_keeps_earlier_checkpoints(run_a, tmp_path, env, data):
    args = base_args(
        data,
        "--mesh",
        "fsdp=8",
        "--schedule-steps",
        str(STEPS),
        "--ckpt-dir",
        str(tmp_path / "ck"),
        "--ckpt-every",
        "1",
        "--keep",
        "100",
        "--metrics-file",
        str(tmp_path / "m.jsonl"),
    )
    proc = popen_train(env, *args, "--steps", str(STEPS))
    # A save starts every step and the next waits for it, so one is nearly always in flight.
    wait_for_step(proc, tmp_path / "m.jsonl", 6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    ck = str(tmp_path / "ck")
    # Saves 1..5 had finished before step 6 was logged: every one must read back whole.
    for step in range(1, 6):
        assert ckpt.verify_step(ck, step) is None, step
    latest = ckpt.latest_valid_step(ck)
    assert latest >= 5 and ckpt.verify_step(ck, latest) is None
    train(env, *args, "--steps", str(latest + 2), "--resume")
    b = rows_of(tmp_path / "m.jsonl")
    assert_losses_match(run_a[1], b, range(1, latest + 3), atol=1e-6)


def test_truncated_and_empty_steps_fall_back(run_a, tmp_path, env, data):
    ck = shutil.copytree(run_a[0] / "ck", tmp_path / "ck")
    shutil.rmtree(ck / "20")
    (ck / "17").mkdir()  # an empty step folder, as orbax would list it
    files = [f for f in (ck / "15").rglob("*") if f.is_file() and "/d/" in str(f)]
    victim = max(files, key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = train(
        env,
        *base_args(
            data,
            "--mesh",
            "fsdp=8",
            "--steps",
            str(STEPS),
            "--ckpt-dir",
            str(ck),
            "--ckpt-every",
            "5",
            "--metrics-file",
            str(tmp_path / "m.jsonl"),
            "--resume",
        ),
    )
    assert "step 17" in out.stderr and "empty" in out.stderr
    assert "step 15" in out.stderr and "falling back to step 10" in out.stderr
    assert "resumed from" in out.stdout and "step 10" in out.stdout
    assert_losses_match(run_a[1], rows_of(tmp_path / "m.jsonl"), range(11, STEPS + 1), 1e-6)


def test_resharded_resume_matches_the_uninterrupted_run(run_a, tmp_path, env, data):
    """Step 10 written on fsdp=8 (run A's), resumed to 20 on data=2,tensor=4."""
    ck = shutil.copytree(run_a[0] / "ck", tmp_path / "ck")
    shutil.rmtree(ck / "15")
    shutil.rmtree(ck / "20")
    out = train(
        env,
        *base_args(
            data,
            "--mesh",
            "data=2,tensor=4",
            "--steps",
            str(STEPS),
            "--ckpt-dir",
            str(ck),
            "--ckpt-every",
            "5",
            "--metrics-file",
            str(tmp_path / "m.jsonl"),
            "--resume",
        ),
    )
    assert "saved on mesh fsdp=8" in out.stdout
    assert_losses_match(run_a[1], rows_of(tmp_path / "m.jsonl"), range(11, STEPS + 1), 2e-5)


def test_resume_refuses_a_different_batch(run_a, env, data):
    out = train(
        env,
        *base_args(
            data,
            "--mesh",
            "fsdp=8",
            "--steps",
            str(STEPS),
            "--batch",
            "16",
            "--ckpt-dir",
            str(run_a[0] / "ck"),
            "--resume",
        ),
        expect=2,
    )
    assert "batch=16" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def run_many(tmp_path_factory, env, data):
    """18 steps with a checkpoint every 2, all kept: many steps to fall back through."""
    root = tmp_path_factory.mktemp("many")
    args = ["--mesh", "fsdp=8", "--steps", "18", "--ckpt-every", "2", "--keep", "9"]
    train(env, *base_args(data, *args, "--ckpt-dir", str(root / "ck"),
                          "--metrics-file", str(root / "m.jsonl")))  # fmt: skip
    return root, args, rows_of(root / "m.jsonl")


def test_falling_back_through_corrupt_optimizer_states_is_one_line_each(
    run_many, tmp_path, env, data
):
    """Each failed restore abandons orbax's other reads in flight; their aftermath (asyncio
    'Event loop is closed' tracebacks, TensorStore specs) used to print thousands of lines.
    Eight corrupt steps in a row made it show on every try; now each is one warning."""
    root, args, reference = run_many
    ck = shutil.copytree(root / "ck", tmp_path / "ck")
    corrupt = [4, 6, 8, 10, 12, 14, 16, 18]
    for step in corrupt:
        files = [f for f in (ck / str(step) / "opt_state").rglob("*") if f.is_file()]
        victim = max(files, key=lambda f: f.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = train(env, *base_args(data, *args, "--ckpt-dir", str(ck), "--resume",
                                "--metrics-file", str(tmp_path / "m.jsonl")))  # fmt: skip
    lines = out.stderr.splitlines()
    assert len(lines) == len(corrupt), out.stderr[-3000:]
    for line, step in zip(lines, reversed(corrupt), strict=True):
        assert line.startswith(f"spmd: warning: checkpoint step {step} in ")
        assert f"set aside as {step}.invalid, falling back to step {step - 2}" in line
    assert "resumed from" in out.stdout and "step 2 " in out.stdout
    assert ckpt.all_steps(ck) == list(range(2, 19, 2))  # saved again by the resumed run
    assert {p.name for p in ck.glob("*.invalid")} == {f"{s}.invalid" for s in corrupt}
    assert_losses_match(reference, rows_of(tmp_path / "m.jsonl"), range(3, 19), atol=1e-6)


def _resume_from_10(source, tmp_path, env, data, cwd=None):
    """Resume a copy of `source` (run A's checkpoint) from step 10, its later steps removed."""
    ck = shutil.copytree(source, tmp_path / "ck")
    shutil.rmtree(ck / "15")
    shutil.rmtree(ck / "20")
    metrics = str(tmp_path / "m.jsonl")
    args = base_args(data, "--mesh", "fsdp=8", "--steps", str(STEPS), "--ckpt-dir", str(ck),
                     "--ckpt-every", "5", "--metrics-file", metrics, "--resume")  # fmt: skip
    return run_spmd(*args, env=env, cwd=cwd)


def test_resume_accepts_the_same_data_by_a_relative_path(run_a, tmp_path, env, data):
    """Run A was given --data as an absolute path; the same file by a relative path is the
    same data, and gives the same batches."""
    folder, name = os.path.split(data)
    out = _resume_from_10(run_a[0] / "ck", tmp_path, env, name, cwd=folder)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    assert_losses_match(run_a[1], rows_of(tmp_path / "m.jsonl"), range(11, STEPS + 1), 1e-6)


def test_resume_refuses_the_same_path_with_other_content(tmp_path, env, data):
    copy = shutil.copy(data, tmp_path / "docs.jsonl")
    args = base_args(str(copy), "--mesh", "fsdp=8", "--ckpt-dir", str(tmp_path / "ck"),
                     "--ckpt-every", "2")  # fmt: skip
    train(env, *args, "--steps", "2")
    with open(copy, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    out = train(env, *args, "--steps", "4", "--resume", expect=2)
    [line] = out.stderr.strip().splitlines()
    assert f"the data {copy} (sha256 " in line and "differs from the data of the checkpoint" in line
    assert ckpt.all_steps(tmp_path / "ck") == [2]


def test_a_checkpoint_from_before_fingerprints_still_resumes_by_path(run_a, tmp_path, env, data):
    """Without a fingerprint in its config, `--data` is compared by its text, as before."""
    legacy = shutil.copytree(run_a[0] / "ck", tmp_path / "legacy")
    for config in legacy.glob("*/config/metadata"):
        saved = json.loads(config.read_text())
        assert saved.pop("data_sha256") and saved.pop("data_abspath") == data
        config.write_text(json.dumps(saved))
    folder, name = os.path.split(data)
    out = _resume_from_10(legacy, tmp_path / "by-name", env, name, cwd=folder)
    assert out.returncode == 2 and f"data={name!r} differs from {data!r}" in out.stderr
    out = _resume_from_10(legacy, tmp_path / "by-path", env, data)
    assert out.returncode == 0, out.stderr
    assert_losses_match(run_a[1], rows_of(tmp_path / "by-path" / "m.jsonl"), range(11, 21), 1e-6)
