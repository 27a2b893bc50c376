"""spmd.distributed: start-up from the environment, and real multi-process runs against one
process on the same number of devices (losses, and checkpoints across process counts)."""

import ipaddress
import json
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import run_spmd, spmd_env

from spmd import distributed as D
from spmd.errors import SpmdError

ENV = ("SPMD_COORDINATOR", "SPMD_NUM_PROCESSES", "SPMD_PROCESS_ID")


def test_group_from_env_reads_all_three_variables():
    assert D.group_from_env({}) is None
    group = D.group_from_env(dict(zip(ENV, ["10.0.0.1:1234", "4", "3"], strict=True)))
    assert group == D.ProcessGroup("10.0.0.1:1234", 4, 3)
    assert not group.is_loopback


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"SPMD_COORDINATOR": "127.0.0.1:1234"}, "SPMD_NUM_PROCESSES, SPMD_PROCESS_ID is not"),
        (dict(zip(ENV, ["127.0.0.1:1234", "two", "0"], strict=True)), "not an integer"),
        (dict(zip(ENV, ["127.0.0.1", "2", "0"], strict=True)), "host:port"),
        (dict(zip(ENV, ["127.0.0.1:99999", "2", "0"], strict=True)), "host:port"),
        (dict(zip(ENV, ["127.0.0.1:1234", "2", "2"], strict=True)), "must be in 0..1"),
        (dict(zip(ENV, ["127.0.0.1:1234", "0", "0"], strict=True)), "must be positive"),
    ],
)
def test_group_from_env_names_the_bad_variable(values, needle):
    with pytest.raises(SpmdError, match=needle):
        D.group_from_env(values)


def test_a_loopback_coordinator_listens_on_loopback_only():
    local = D.ProcessGroup("127.0.0.1:1234", 2, 0)
    assert D.bind_address(local, {}) == "127.0.0.1:1234"
    assert D.bind_address(D.ProcessGroup("localhost:1234", 2, 0), {}) == "localhost:1234"
    assert D.bind_address(D.ProcessGroup("[::1]:1234", 2, 0), {}) == "[::1]:1234"
    # Asked for something else, or a real cluster: JAX's choice (every interface).
    assert D.bind_address(local, {"JAX_COORDINATOR_BIND_ADDRESS": "0.0.0.0:1234"}) is None
    assert D.bind_address(D.ProcessGroup("10.0.0.1:1234", 2, 0), {}) is None


def test_initialize_is_a_no_op_in_a_plain_run(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    if D.detected_cluster():
        pytest.skip("running inside a multi-process cluster job")
    assert D.initialize() is False
    assert D.initialize() is False
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and D.is_main_process()
    assert D.AnyProcess()(True) is True and D.AnyProcess()(False) is False


def test_initialize_after_jax_started_is_a_clear_error(monkeypatch):
    jax.devices()  # the backend is running now
    for name, value in zip(ENV, ["127.0.0.1:1234", "2", "0"], strict=True):
        monkeypatch.setenv(name, value)
    with pytest.raises(SpmdError, match="before any JAX computation"):
        D.initialize()


def _listeners(port: int) -> list:
    """Addresses with a listening TCP socket on `port`, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # each 32-bit word in little-endian order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(ipaddress.ip_address(raw))
    return found


def _is_loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def test_launched_coordinator_listens_on_loopback_only():
    """Rank 0 of a 2-process job, started as `spmd launch` starts it, with no rank 1: its
    coordinator listens (waiting for rank 1) for as long as we look."""
    from spmd.commands.launch import child_env, coordinator_port

    port = coordinator_port(None)
    env = child_env(0, 2, 1, port)
    assert env["SPMD_COORDINATOR"] == f"127.0.0.1:{port}"
    rank0 = subprocess.Popen(
        [sys.executable, "-m", "spmd.cli", "models"],
        env=spmd_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    seen = []
    try:
        deadline = time.monotonic() + 120
        while not seen and rank0.poll() is None and time.monotonic() < deadline:
            seen = _listeners(port)
            time.sleep(0.05)
    finally:
        rank0.kill()
        _, err = rank0.communicate()
    assert seen, f"the coordinator was never seen listening: {err.decode()[-2000:]}"
    assert all(_is_loopback(a) for a in seen), seen


VOTER = """
import json, sys
import jax
from spmd import distributed as D
joined = [D.initialize(), D.initialize()]  # the second call is a no-op
rank = int(sys.argv[1])
any_process = D.AnyProcess()
votes = [any_process(rank == 1 and call == 2) for call in range(5)]
print(json.dumps({"joined": joined, "votes": votes, "processes": jax.process_count()}))
"""


def test_processes_agree_on_a_flag_one_call_late():
    """Only rank 1 raises the flag, on call 2; both processes see it on call 3."""
    from spmd.commands.launch import child_env, coordinator_port

    port = coordinator_port(None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", VOTER, str(rank)],
            env=spmd_env(child_env(rank, 2, 2, port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result == {
            "joined": [True, True],
            "votes": [False, False, False, True, False],
            "processes": 2,
        }


# --- real runs: 2 processes x 4 devices against 1 process x 8 devices ----------------------

TRAIN = [
    "train", "--model", "gpt-tiny", "--set", "n_layers=2", "--mesh", "fsdp=4,tensor=2",
    "--steps", "8", "--batch", "8", "--seq", "32", "--ckpt-every", "6",
]  # fmt: skip
TWO_PROCESSES = ["launch", "-n", "2", "--devices-per-process", "4", "--", "spmd"]
ONE_PROCESS = ["--devices", "8"]


def _train(tmp, prefix: list[str], suffix: list[str], name: str, *extra: str):
    """Run `spmd train` as `prefix` says; returns (CompletedProcess, metrics rows, seconds)."""
    metrics = tmp / f"{name}.jsonl"
    t0 = time.perf_counter()
    out = run_spmd(
        *prefix, *TRAIN, *suffix, "--data", str(tmp / "corpus.txt"),
        "--metrics-file", str(metrics), *extra, timeout=600,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out, [json.loads(line) for line in metrics.read_text().splitlines()], seconds


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same 8 steps in 2 processes and in 1, each saving a checkpoint at step 6."""
    tmp = tmp_path_factory.mktemp("pair")
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(600))
    (tmp / "corpus.txt").write_text(text)
    two = _train(tmp, TWO_PROCESSES, [], "two", "--ckpt-dir", str(tmp / "ckpt_two"))
    one = _train(tmp, [], ONE_PROCESS, "one", "--ckpt-dir", str(tmp / "ckpt_one"))
    return tmp, two, one


def _close(a, b):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)  # the bound, per step


def _losses(rows, steps) -> np.ndarray:
    by_step = {r["step"]: r["loss"] for r in rows}
    return np.array([by_step[s] for s in steps])


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one(pair):
    _, (out, two, seconds), (_, one, _) = pair
    print(f"2-process run: {seconds:.1f}s wall")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 9))
    _close(_losses(two, range(1, 9)), _losses(one, range(1, 9)))
    assert _losses(two, [8])[0] < _losses(two, [1])[0] - 0.5  # it trained
    # Every line carries its rank; only rank 0 prints the summary and the progress bar.
    assert all(line[:4] in ("[0] ", "[1] ") for line in out.stdout.splitlines())
    assert [line[:4] for line in out.stdout.splitlines() if "done: 8 steps" in line] == ["[0] "]
    assert "[0] " in out.stderr and "step/s" in out.stderr
    assert not [line for line in out.stderr.splitlines() if line.startswith("[1]") and "|" in line]


@pytest.mark.slow
def test_checkpoints_resume_with_another_process_count(pair):
    """Each run's step-6 checkpoint resumes in the other layout and gives its steps 7-8."""
    tmp, (_, two, _), (_, one, _) = pair
    for name in ("ckpt_two", "ckpt_one"):
        shutil.rmtree(tmp / name / "8")  # resume from step 6, not from the end
    out, two_then_one, _ = _train(
        tmp, [], ONE_PROCESS, "two_then_one", "--ckpt-dir", str(tmp / "ckpt_two"), "--resume"
    )
    assert "resumed from" in out.stdout and "step 6" in out.stdout
    assert [r["step"] for r in two_then_one] == [7, 8]
    _close(_losses(two_then_one, [7, 8]), _losses(two, [7, 8]))
    out, one_then_two, _ = _train(
        tmp, TWO_PROCESSES, [], "one_then_two", "--ckpt-dir", str(tmp / "ckpt_one"), "--resume"
    )
    assert "[0] resumed from" in out.stdout
    assert [r["step"] for r in one_then_two] == [7, 8]
    _close(_losses(one_then_two, [7, 8]), _losses(one, [7, 8]))


def test_job_rank_is_read_without_joining(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    if D.detected_cluster():
        pytest.skip("running inside a multi-process cluster job")
    assert D.job_rank() == 0
    for name, value in zip(ENV, ["127.0.0.1:1234", "4", "3"], strict=True):
        monkeypatch.setenv(name, value)
    assert D.job_rank() == 3
    assert not jax.distributed.is_initialized()


# --- every process restores the same step ----------------------------------------------

AGREE = [
    "train", "--model", "gpt-tiny", "--set", "n_layers=2,d_model=64", "--mesh", "fsdp=4,tensor=2",
    "--batch", "8", "--seq", "32", "--ckpt-every", "2", "--ckpt-dir", "ck", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def steps_2_and_4(tmp_path_factory, env):
    """A 1-process run's checkpoints at steps 2 and 4 in one/ck, and its data file."""
    tmp = tmp_path_factory.mktemp("agree")
    (tmp / "one").mkdir()
    (tmp / "corpus.txt").write_text(
        "".join(f"line {i}: a tale of two ranks.\n" for i in range(600))
    )
    out = run_spmd(
        *AGREE, "--steps", "4", "--devices", "8", "--data", str(tmp / "corpus.txt"),
        env=env, cwd=str(tmp / "one"), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "one" / "ck", ["--data", str(tmp / "corpus.txt")]


def _copies(ckpt_dir, tmp, corrupt_in: str) -> list:
    """Folders A/ and B/ holding the same checkpoint, except that step 4's optimizer state
    is truncated in `corrupt_in` only: exactly one process will find it unreadable."""
    for name in ("A", "B"):
        shutil.copytree(ckpt_dir, tmp / name / "ck")
    files = [f for f in (tmp / corrupt_in / "ck" / "4" / "opt_state").rglob("*") if f.is_file()]
    victim = max(files, key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return [tmp / "A", tmp / "B"]


def _two_processes_in(folders, args, env) -> list:
    """Ranks 0 and 1 of one job, started by hand as `spmd launch` would start them, each in
    its own working directory; returns each one's (exit status, stdout, stderr)."""
    from spmd.commands.launch import child_env, coordinator_port

    port = coordinator_port(None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "spmd.cli", *args],
            cwd=str(folder),
            env=spmd_env({**env, **child_env(rank, 2, 4, port)}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank, folder in enumerate(folders)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outs, strict=True)]
    finally:
        for p in procs:
            p.kill()


def _listing(folder) -> list[str]:
    return sorted(p.name for p in (folder / "ck").iterdir())


@pytest.mark.slow
def test_a_process_that_cannot_read_the_chosen_step_stops_the_job(steps_2_and_4, tmp_path, env):
    """Rank 0 (in A/) reads step 4 whole; rank 1 (in B/, whose copy is truncated) cannot.
    Orbax does not mind that the processes' relative `ck` are different folders, and that is
    what makes exactly one of them fail. Rank 1 must not fall back to step 2 on its own (the
    two would train different states): the job stops, one line each, no folder renamed."""
    ckpt_dir, data = steps_2_and_4
    folders = _copies(ckpt_dir, tmp_path, corrupt_in="B")
    before = [_listing(f) for f in folders]
    (rc0, _, err0), (rc1, _, err1) = _two_processes_in(
        folders, [*AGREE, "--steps", "6", *data, "--resume"], env
    )
    assert (rc0, rc1) == (2, 2), err0[-2000:] + err1[-2000:]
    assert err0.strip().splitlines() == [
        "spmd: error: process 1 could not restore checkpoint step 4 in ck (its own line says "
        "why); every process must restore the same step, so the job stops; every checkpoint "
        "folder was left as it was"
    ]
    [line] = err1.strip().splitlines()
    assert "this process cannot read checkpoint step 4 in ck (reading it failed: " in line
    assert "but process 0 restored it" in line
    assert [_listing(f) for f in folders] == before == [["2", "4"], ["2", "4"]]


@pytest.mark.slow
def test_when_process_0_cannot_read_a_step_every_process_falls_back(steps_2_and_4, tmp_path, env):
    """The mirror case: rank 0 finds step 4 corrupt, so the job falls back to step 2, and
    rank 1, which could read step 4, restores step 2 with it."""
    ckpt_dir, data = steps_2_and_4
    folders = _copies(ckpt_dir, tmp_path, corrupt_in="A")
    (rc0, out0, err0), (rc1, _, err1) = _two_processes_in(
        folders, [*AGREE, "--steps", "2", *data, "--resume"], env
    )
    assert (rc0, rc1) == (0, 0), err0[-2000:] + err1[-2000:]
    [warning] = err0.strip().splitlines()
    assert "step 4 in ck is not valid" in warning and "falling back to step 2" in warning
    assert err1.strip() == ""
    assert "resumed from ck step 2" in out0
    assert _listing(folders[0]) == ["2", "4.invalid"]  # process 0 sets aside, in its folder
