"""Every test runs on 8 simulated CPU devices, set before JAX starts its backend."""

import os
import subprocess
import sys

import pytest

import spmd

spmd.simulate_cpu_devices(8)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spmd_env(extra: dict | None = None) -> dict:
    """Environment for an `spmd` subprocess: no inherited device-count flags, quiet logs."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_spmd(*args: str, timeout: float = 300, env: dict | None = None, cwd: str | None = None):
    """Run `spmd ARGS...` in a fresh interpreter; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "spmd.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=spmd_env(env),
        cwd=cwd,
    )


def jsonl_corpus(path, docs: int = 300) -> str:
    """A small code-like corpus as JSON Lines, the same every time (seeded)."""
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "(x)", "+", "1", "for", "in", "\n"]
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": f"# doc {i}\n" + " ".join(rng.choice(words, 120))}) + "\n")
    return str(path)


@pytest.fixture
def spmd_cli():
    return run_spmd


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Extra environment for spmd subprocesses: one persistent JAX compilation cache for the
    whole session, so a program that several tests run compiles only once."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
