"""The trainer's guards: NaN stops, SIGTERM saves and exits 0, BPE runs, bad flags."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_spmd, spmd_env

from spmd import checkpoint as ckpt
from spmd.data.tokenizer import load_tokenizer, train_bpe
from spmd.errors import SpmdError
from spmd.models import get_model
from spmd.train.stop import StopFlag
from spmd.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    rng = np.random.default_rng(1)
    words = ["while", "yield", "lambda", "x", "=", "0", "if", ":", "\n"]
    with open(path, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"# {i}\n" + " ".join(rng.choice(words, 100))}) + "\n")
    return str(path)


def args(data, tmp_path, *extra):
    return ["train", "--devices", "4", "--mesh", "fsdp=2,tensor=2", "--set",
            "n_layers=2,d_model=64", "--batch", "4", "--seq", "32", "--data", data,
            "--no-progress", "--ckpt-dir", str(tmp_path / "ck"), "--metrics-file",
            str(tmp_path / "m.jsonl"), *extra]  # fmt: skip


def steps_logged(path) -> list[int]:
    if not Path(path).is_file():
        return []
    steps = []
    for line in Path(path).read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


@pytest.mark.slow
def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, env, data):
    out = run_spmd(*args(data, tmp_path, "--steps", "30", "--lr", "1e9", "--warmup", "0",
                         "--ckpt-every", "1"), env=env)  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    bad = int(message.split(" at step ")[1].split()[0])
    assert "became nan" in message.lower() or "became inf" in message.lower()
    # Every step before the bad one was saved and reads back whole; the bad one never was.
    ck = str(tmp_path / "ck")
    assert ckpt.all_steps(ck) == list(range(max(1, bad - 2), bad))
    assert all(ckpt.verify_step(ck, s) is None for s in ckpt.all_steps(ck))
    assert max(steps_logged(tmp_path / "m.jsonl")) == bad - 1


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_with_a_bpe_tokenizer(tmp_path, env, data):
    tok = str(tmp_path / "tok.json")
    train_bpe([json.loads(line)["text"] for line in open(data)], 300, tok)
    run_args = args(data, tmp_path, "--tokenizer", tok, "--ckpt-every", "1000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spmd.cli", *run_args, "--steps", "100000"],
        env=spmd_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while len(steps_logged(tmp_path / "m.jsonl")) < 3 and proc.poll() is None:
        assert time.monotonic() < deadline, "no steps logged"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    last = max(steps_logged(tmp_path / "m.jsonl"))
    assert f"stopped by SIGTERM at step {last}" in stdout
    assert "resume with: spmd train" in stdout and "--resume" in stdout
    ck = str(tmp_path / "ck")
    assert ckpt.all_steps(ck) == [last] and ckpt.verify_step(ck, last) is None
    config = ckpt.load_run_config(ck)
    vocab = load_tokenizer(tok).vocab_size
    assert get_model(config["model"], dict(config["overrides"])).cfg.vocab_size == vocab
    assert ckpt.read_json_item(ck, last, "meta")["loader"] == {"next_batch": last}

    # The same schedule, so the same program: the compilation cache serves it.
    resume = [*run_args, "--steps", str(last + 2), "--schedule-steps", "100000", "--resume"]
    out = run_spmd(*resume, env=env)
    assert out.returncode == 0, out.stderr
    assert f"resumed from {ck} step {last}" in out.stdout
    assert steps_logged(tmp_path / "m.jsonl") == list(range(1, last + 3))


def test_a_fresh_run_refuses_a_used_checkpoint_dir(tmp_path, env, data):
    (tmp_path / "ck" / "5").mkdir(parents=True)
    out = run_spmd(*args(data, tmp_path, "--steps", "2"), env=env)
    assert out.returncode == 2
    assert "already holds checkpoints" in out.stderr and "--resume" in out.stderr


def test_eval_needs_a_validation_split(tmp_path, env):
    one_doc = tmp_path / "one.txt"
    one_doc.write_text("x = 1\n" * 2000)
    out = run_spmd(*args(str(one_doc), tmp_path, "--steps", "2", "--eval-every", "1"), env=env)
    assert out.returncode == 2 and "--eval-every needs a validation split" in out.stderr


def test_config_validation():
    with pytest.raises(SpmdError, match="--resume needs --ckpt-dir"):
        TrainConfig(resume=True)
    with pytest.raises(SpmdError, match="--eval-every=0"):
        TrainConfig(eval_every=0)


def test_stop_flag_catches_sigterm_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
