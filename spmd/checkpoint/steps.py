"""What is on disk: the step folders, whether each is whole, and their JSON items."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from spmd.distributed import is_main_process
from spmd.errors import SpmdError

ARRAY_ITEMS = ("params", "opt_state")
JSON_ITEMS = ("meta", "config")
ITEMS = ARRAY_ITEMS + JSON_ITEMS


def orbax_checkpoint():
    import orbax.checkpoint as ocp  # slow to import; only checkpointing code needs it

    return ocp


def warn(msg: str) -> None:
    if is_main_process():
        print(f"spmd: warning: {msg}", file=sys.stderr, flush=True)


def all_steps(ckpt_dir: str) -> list[int]:
    """Every step folder, valid or not (orbax's temporary folders are not steps)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def step_problem(ckpt_dir: str, step: int) -> str | None:
    """Why step `step` cannot be a finished checkpoint, or None if its structure is whole.

    This reads only metadata; a truncated array file shows when the arrays are read. An
    OSError other than a missing file (no permission, EIO) is raised: it is no verdict.
    """
    path = Path(ckpt_dir) / str(step)
    if not path.is_dir() or not any(path.iterdir()):
        return "the folder is empty"
    if not (path / "_CHECKPOINT_METADATA").is_file():
        return "it has no _CHECKPOINT_METADATA (the save never finished)"
    for item in ARRAY_ITEMS:
        if not (path / item / "_METADATA").is_file():
            return f"item {item!r} is missing or incomplete"
    for item in JSON_ITEMS:
        try:
            json.loads((path / item / "metadata").read_text())
        except (FileNotFoundError, ValueError):
            return f"item {item!r} is missing or not JSON"
    return None


def latest_valid_step(ckpt_dir: str) -> int | None:
    """The newest step whose folder is whole (see `step_problem`), or None."""
    try:
        for step in reversed(all_steps(ckpt_dir)):
            if step_problem(ckpt_dir, step) is None:
                return step
    except OSError as e:
        raise SpmdError(f"cannot read the checkpoints in {ckpt_dir}: {e}") from None
    return None


def read_json_item(ckpt_dir: str, step: int, item: str) -> dict:
    try:
        return read_json(ckpt_dir, step, item)
    except (OSError, ValueError) as e:
        raise SpmdError(f"checkpoint {ckpt_dir} step {step}: {item} is unreadable ({e})") from None


def read_json(ckpt_dir: str, step: int, item: str) -> dict:
    return json.loads((Path(ckpt_dir) / str(step) / item / "metadata").read_text())


def load_run_config(ckpt_dir: str, step: int | None = None) -> dict:
    """The run's TrainConfig as a dict (`model`, `overrides`, `batch`, `seq`, ...)."""
    return read_json_item(ckpt_dir, pick_step(ckpt_dir, step), "config")


def pick_step(ckpt_dir: str, step: int | None) -> int:
    if not Path(ckpt_dir).is_dir():
        raise SpmdError(f"checkpoint directory {ckpt_dir} does not exist")
    if step is None:
        step = latest_valid_step(ckpt_dir)
        if step is None:
            raise SpmdError(f"{ckpt_dir} holds no valid checkpoint")
        return step
    problem = step_problem(ckpt_dir, step)
    if problem:
        raise SpmdError(f"checkpoint {ckpt_dir} step {step} is not valid: {problem}")
    return step


def disk_bytes(ckpt_dir: str, step: int) -> int:
    return sum(f.stat().st_size for f in (Path(ckpt_dir) / str(step)).rglob("*") if f.is_file())
