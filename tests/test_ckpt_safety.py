"""Checkpoints that cannot betray a run: one run per folder, failed saves, late signals,
and a metrics file that a resume rewrites without ever truncating it.

The in-process tests inject faults into orbax's JSON item writer, which runs in orbax's
background threads like every other write of an asynchronous save. The subprocess tests run
`spmd train` for real, some through tests/fixtures/orbax_faults.py, which does the same.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax.numpy as jnp
import pytest
from conftest import REPO, jsonl_corpus, run_spmd, spmd_env
from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

from spmd import checkpoint as ckpt
from spmd.errors import SpmdError
from spmd.train import monitor
from spmd.train.lock import LOCK_NAME, RunLock
from spmd.train.stop import StopFlag

FAULTS = os.path.join(REPO, "tests", "fixtures", "orbax_faults.py")


# ----------------------------------------------------------------------------- helpers


def fail_writes_of(monkeypatch, step: int) -> None:
    write = jch.JsonCheckpointHandler._save_fn

    async def failing(self, x, directory):
        if Path(directory).parent.name.split(".")[0] == str(step):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await write(self, x, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", failing)


def tiny_state():
    return types.SimpleNamespace(params={"w": jnp.arange(4.0)}, opt_state={"m": jnp.zeros(4)})


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return jsonl_corpus(tmp_path_factory.mktemp("data") / "docs.jsonl")


def train_args(data, tmp_path, *extra):
    """The programs of tests/test_resume.py (the same schedule), so the compile cache serves."""
    return ["train", "--devices", "8", "--mesh", "fsdp=8", "--set", "n_layers=2,d_model=64",
            "--batch", "8", "--seq", "32", "--lr", "3e-3", "--warmup", "2", "--schedule-steps",
            "20", "--data", data, "--no-progress", "--ckpt-dir", str(tmp_path / "ck"),
            "--metrics-file", str(tmp_path / "m.jsonl"), *extra]  # fmt: skip


def popen(env, *argv, script=None):
    head = [script] if script else ["-m", "spmd.cli"]
    return subprocess.Popen(
        [sys.executable, *head, *argv], env=spmd_env(env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def logged(path) -> list[int]:
    steps = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass  # a line being written
    return steps


def wait_until(proc, ready, what: str, timeout: float = 300) -> None:
    """Block until `ready()` (no timing is asserted, this only waits)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"run ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never saw {what}")
        time.sleep(0.1)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# ----------------------------------------------------------------------------- 1. the lock


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(str(tmp_path / "ck")):
        record = json.loads((tmp_path / "ck" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(SpmdError, match=f"in use by another run \\(pid {os.getpid()} on host"):
            RunLock(str(tmp_path / "ck")).__enter__()
    assert not (tmp_path / "ck").exists()  # it made the folder, and nothing was saved in it


def test_a_dead_runs_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    pid = dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "started": "yesterday"}
    (tmp_path / "ck" / LOCK_NAME).write_text(json.dumps(stale))
    with RunLock(str(tmp_path / "ck")):
        assert json.loads((tmp_path / "ck" / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the lock in {tmp_path / 'ck'} left by a run that died (pid {pid}" in err
    assert len(err.strip().splitlines()) == 1
    assert list((tmp_path / "ck").iterdir()) == []  # released; the folder was not its own


def test_orbax_ignores_the_lock_file(tmp_path):
    with RunLock(str(tmp_path / "ck")):
        saver = ckpt.Checkpointer(str(tmp_path / "ck"), 1, 5)
        saver.save(3, tiny_state(), {}, {})
        saver.close()
        assert saver.manager.all_steps() == [3] and ckpt.all_steps(tmp_path / "ck") == [3]
        assert ckpt.verify_step(str(tmp_path / "ck"), 3) is None
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["3"]


@pytest.mark.slow
def test_a_second_run_on_a_live_runs_folder_is_refused_before_compiling(tmp_path, env, data):
    first = popen(env, *train_args(data, tmp_path, "--steps", "100000", "--ckpt-every", "1000"))
    wait_until(first, lambda: len(logged(tmp_path / "m.jsonl")) >= 2, "step 2")
    argv = train_args(data, tmp_path / "second", "--steps", "2")  # its own metrics file
    argv[argv.index("--ckpt-dir") + 1] = str(tmp_path / "ck")
    t0 = time.monotonic()
    refused = run_spmd(*argv, env=env)
    elapsed = time.monotonic() - t0
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = one_error_line(refused.stderr)
    assert (
        str(tmp_path / "ck") in line and f"pid {first.pid} on host {socket.gethostname()}" in line
    )
    assert "compiled" not in refused.stdout and elapsed < 60  # generous: no compile happened
    assert first.returncode == 0, out + err
    assert not (tmp_path / "ck" / LOCK_NAME).exists()
    last = max(logged(tmp_path / "m.jsonl"))
    assert ckpt.all_steps(tmp_path / "ck") == [last]


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_a_finished_run_leaves_none(tmp_path, env, data):
    (tmp_path / "ck").mkdir()
    pid = dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "started": "yesterday"}
    (tmp_path / "ck" / LOCK_NAME).write_text(json.dumps(stale))
    out = run_spmd(*train_args(data, tmp_path, "--steps", "2"), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    line = one_error_line(out.stderr)
    assert line.startswith("spmd: warning: taking over the lock") and f"pid {pid}" in line
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2"]


# ----------------------------------------------------------------------------- 2. failed saves


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_names_its_own_step_and_what_is_intact(tmp_path, monkeypatch, async_save):
    fail_writes_of(monkeypatch, 2)
    saver = ckpt.Checkpointer(str(tmp_path), 1, 5, async_save=async_save)
    saver.save(1, tiny_state(), {}, {})
    with pytest.raises(SpmdError) as raised:
        saver.save(2, tiny_state(), {}, {})
        saver.save(3, tiny_state(), {}, {})  # an async write's failure surfaces here
    saver.close()  # says nothing more: the failure was reported once
    assert str(raised.value) == (
        f"saving checkpoint step 2 to {tmp_path} failed: No space left on device; step 1 is intact"
    )
    assert ckpt.all_steps(tmp_path) == [1] and ckpt.verify_step(str(tmp_path), 1) is None


def test_a_failed_last_save_is_reported_by_the_final_wait(tmp_path, monkeypatch):
    fail_writes_of(monkeypatch, 3)
    saver = ckpt.Checkpointer(str(tmp_path), 1, 5)
    for step in (1, 2, 3):
        saver.save(step, tiny_state(), {}, {})
    with pytest.raises(
        SpmdError, match="step 3 .* failed: No space left on device; steps 1, 2 are"
    ):
        saver.close()


@pytest.mark.slow
def test_a_run_whose_async_save_fails_exits_2_naming_the_step(tmp_path, env, data):
    argv = train_args(data, tmp_path, "--steps", "20", "--ckpt-every", "5")
    proc = popen(env, "enospc", "10", "--", *argv, script=FAULTS)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    assert one_error_line(err) == (
        f"spmd: error: saving checkpoint step 10 to {tmp_path / 'ck'} failed: "
        "No space left on device; step 5 is intact"
    )
    assert max(logged(tmp_path / "m.jsonl")) == 14  # it surfaced when step 15 began its save
    assert ckpt.all_steps(tmp_path / "ck") == [5]
    assert ckpt.verify_step(str(tmp_path / "ck"), 5) is None
    assert not (tmp_path / "ck" / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_checkpoint_folder_replaced_mid_run_ends_it_with_one_line(tmp_path, env, data):
    """A real failure: the folder goes away (moved, as a clean-up script might) and a file
    takes its name, so orbax's writes, in flight or next, cannot reach their step folders."""
    proc = popen(env, *train_args(data, tmp_path, "--steps", "100000", "--ckpt-every", "5"))
    wait_until(proc, lambda: len(logged(tmp_path / "m.jsonl")) >= 7, "step 7")
    (tmp_path / "ck").rename(tmp_path / "moved")
    (tmp_path / "ck").write_text("not a folder")
    out, err = proc.communicate(timeout=300)  # promptly: orbax's stuck threads are not joined
    assert proc.returncode == 2, out + err
    # When a write in flight loses its folder, tensorstore prints tracebacks of its own from
    # C++ callbacks (orbax 0.12.8), even interleaved with spmd's line; that line is still there.
    line = err[err.index("spmd: error: saving checkpoint step ") :].splitlines()[0]
    step = int(line.split("saving checkpoint step ")[1].split()[0])
    assert step % 5 == 0 and "no earlier step is intact" in line, line
    assert (tmp_path / "ck").read_text() == "not a folder"


# ----------------------------------------------------------------------------- 3. signals


def test_a_signal_while_saving_is_reported_and_changes_nothing(capsys):
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGTERM)
        stop.saving = 7
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "spmd: still saving step 7;" in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_sigterm_during_the_final_save_does_not_cut_it(tmp_path, env, data):
    marker = tmp_path / "final-wait"
    argv = train_args(data, tmp_path, "--steps", "100000", "--ckpt-every", "1000")
    proc = popen(env, "slow", str(marker), "--", *argv, script=FAULTS)
    wait_until(proc, lambda: len(logged(tmp_path / "m.jsonl")) >= 2, "step 2")
    proc.send_signal(signal.SIGTERM)
    wait_until(proc, marker.exists, "the final wait")  # the save's writes take 4 s more
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    last = max(logged(tmp_path / "m.jsonl"))
    assert f"spmd: still saving step {last};" in err and "Traceback" not in err
    assert f"stopped by SIGTERM at step {last}" in out
    assert ckpt.all_steps(tmp_path / "ck") == [last]
    assert ckpt.verify_step(str(tmp_path / "ck"), last) is None


# ----------------------------------------------------------------------------- 4. metrics file


def metrics_file(tmp_path, steps) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps))
    return path


def test_a_failed_metrics_rewrite_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = metrics_file(tmp_path, range(1, 9))
    before = path.read_bytes()
    rows = monitor._earlier_rows(str(path), 5)
    dumps, calls = json.dumps, []

    def dies_on_the_third_row(obj, *a, **k):  # as a kill or a full disk would, mid-write
        calls.append(obj)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return dumps(obj, *a, **k)

    monkeypatch.setattr(monitor.json, "dumps", dies_on_the_third_row)
    with pytest.raises(OSError):
        monitor._rewrite(str(path), rows)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temporary file left


def test_a_resume_keeps_the_rows_up_to_its_step_and_appends(tmp_path):
    path = metrics_file(tmp_path, [*range(1, 9), 7])  # a killed run's rows past step 5
    with path.open("a") as f:
        f.write('{"step": 9, "lo')  # and a line cut short by the kill
    sink = monitor._rewrite(str(path), monitor._earlier_rows(str(path), 5))
    sink.write(json.dumps({"step": 6, "loss": 0.5}) + "\n")
    sink.close()
    assert logged(path) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]
