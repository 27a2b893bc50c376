"""Sharded checkpoints with orbax: asynchronous saves, validated restores, resharding.

A checkpoint step folder holds four orbax items: `params` and `opt_state` (sharded arrays,
written by every process), `meta` (the step, the data iterator state and the RNG, as JSON)
and `config` (the run's TrainConfig, as JSON). Nothing is pickled, so loading a checkpoint
never runs code.

Restores go straight into the target shardings: the abstract arrays handed to orbax carry
the new mesh's shardings, so each device reads only its own slices, whatever mesh wrote them.

Orbax lists any step folder, even an empty or half-written one, as a step, and a truncated
data file only shows when it is read. So every step is checked before it is trusted, and a
restore that finds the step corrupt falls back to the previous step with one warning line.
A failure that says nothing against the step's bytes (out of memory, no permission, a
filesystem hiccup) stops instead and leaves every step folder as it was: `spmd.ckpt_faults`
tells the two apart. In a multi-process job, process 0 chooses the step and every process
restores exactly that one; if any process cannot, the whole job stops.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from spmd import ckpt_faults, ckpt_quiet
from spmd.distributed import allgather_int, is_main_process
from spmd.errors import SpmdError

ARRAY_ITEMS = ("params", "opt_state")
JSON_ITEMS = ("meta", "config")
ITEMS = ARRAY_ITEMS + JSON_ITEMS


def _ocp():
    import orbax.checkpoint as ocp  # slow to import; only checkpointing code needs it

    return ocp


def warn(msg: str) -> None:
    if is_main_process():
        print(f"spmd: warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inspection


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
        return _read_json(ckpt_dir, step, item)
    except (OSError, ValueError) as e:
        raise SpmdError(f"checkpoint {ckpt_dir} step {step}: {item} is unreadable ({e})") from None


def _read_json(ckpt_dir: str, step: int, item: str) -> dict:
    return json.loads((Path(ckpt_dir) / str(step) / item / "metadata").read_text())


def load_run_config(ckpt_dir: str, step: int | None = None) -> dict:
    """The run's TrainConfig as a dict (`model`, `overrides`, `batch`, `seq`, ...)."""
    return read_json_item(ckpt_dir, _pick_step(ckpt_dir, step), "config")


def _pick_step(ckpt_dir: str, step: int | None) -> int:
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


# ----------------------------------------------------------------------------- saving


class Checkpointer:
    """Saves every `every` steps (asynchronously unless `async_save=False`), keeping `keep`."""

    def __init__(self, ckpt_dir: str, every: int, keep: int, async_save: bool = True):
        if every < 1 or keep < 1:
            raise SpmdError(f"--ckpt-every={every} and --keep={keep} must be positive")
        ocp = _ocp()
        self.directory, self.every = str(Path(ckpt_dir).absolute()), every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
            ),
        )

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state, meta: dict, config: dict) -> None:
        """Starts the save; returns once the arrays are copied off the devices."""
        ocp = _ocp()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave({**meta, "step": step}),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ----------------------------------------------------------------------------- restoring


OK, CORRUPT, FAILED = 0, 1, 2  # one process's verdict on one step, shared with the others


def restore_with_fallback(
    ckpt_dir: str, restore: Callable[[int], Any], step: int | None = None, set_aside=False
):
    """`(step, restore(step))` for the newest step that restores, one warning per corrupt
    step skipped. `restore` must not run collectives: processes may disagree on a step.

    Returns None if there is no step folder at all; raises SpmdError if no step restores,
    or at once, with every folder as it was, for a failure that says nothing against the
    step's bytes (see `spmd.ckpt_faults`). With `step` given, only that step is tried. In a
    job of several processes, process 0's steps and verdicts choose: the others follow it,
    or stop the whole job. `set_aside` says in each warning that the caller will rename the
    skipped step (`set_aside_newer`).
    """
    steps = all_steps(ckpt_dir) if step is None else [step]
    failures: list[int] = []
    candidate = _next_candidate(steps, None)
    while candidate is not None:
        verdict, detail, result = _attempt(ckpt_dir, candidate, restore)
        verdicts = allgather_int(verdict)
        if all(v == OK for v in verdicts):
            return candidate, result
        if FAILED in verdicts or verdicts[0] == OK:
            _stop(ckpt_dir, candidate, verdicts, verdict, detail)
        failures.append(candidate)
        _warn_skipped(ckpt_dir, candidate, detail, [s for s in steps if s < candidate], set_aside)
        candidate = _next_candidate(steps, candidate)
    if not failures:
        return None
    raise SpmdError(
        f"{ckpt_dir} holds no valid checkpoint (steps {', '.join(map(str, failures))} "
        "are all incomplete or corrupt)"
    )


def _warn_skipped(ckpt_dir: str, step: int, why: str, older: list[int], set_aside: bool):
    """The one line a user sees for a skipped step (process 0's listing names the older)."""
    then = f"falling back to step {older[-1]}" if older else "no earlier step to fall back to"
    if set_aside and older:
        then = f"it is set aside as {_invalid_path(ckpt_dir, step).name}, {then}"
    warn(f"checkpoint step {step} in {ckpt_dir} is not valid ({why}); {then}")


def _next_candidate(steps: list[int], below: int | None) -> int | None:
    """Process 0's next step to try, newest first (a collective: every process asks)."""
    mine = max((s for s in steps if below is None or s < below), default=-1)
    chosen = allgather_int(mine)[0]
    return None if chosen < 0 else chosen


def _attempt(ckpt_dir: str, step: int, restore: Callable[[int], Any]):
    """This process's `(verdict, why, result)` for `step`; it raises nothing, so that every
    process gets to share its verdict."""
    try:
        problem = step_problem(ckpt_dir, step)
        if problem:
            return CORRUPT, problem, None
        return OK, None, restore(step)
    except Exception as e:  # orbax and tensorstore raise many kinds; ckpt_faults sorts them
        reason, line = ckpt_faults.not_corruption(e), ckpt_faults.first_line(e)
    gc.collect()  # frees what the failed attempt read (its traceback is gone now)
    if reason is None:
        return CORRUPT, f"reading it failed: {line}", None
    return FAILED, f"{reason}: {line}", None


def _stop(ckpt_dir: str, step: int, verdicts: list[int], verdict: int, detail: str | None):
    kept = "every checkpoint folder was left as it was"
    where = f"checkpoint step {step} in {ckpt_dir}"
    if verdict == FAILED:
        raise SpmdError(f"could not restore {where} ({detail}); {kept}")
    if verdict == CORRUPT:
        raise SpmdError(
            f"this process cannot read {where} ({detail}) but process 0 restored it; every "
            f"process must restore the same step, so the job stops; {kept}"
        )
    others = ", ".join(str(i) for i, v in enumerate(verdicts) if v != OK)
    raise SpmdError(
        f"process {others} could not restore {where} (its own line says why); every "
        f"process must restore the same step, so the job stops; {kept}"
    )


def set_aside_newer(ckpt_dir: str, step: int) -> list[str]:
    """Rename step folders newer than `step` (all invalid, or the restore would have used
    them) to `<step>.invalid`, so the resumed run can save those steps again."""
    moved = []
    if is_main_process():
        for s in all_steps(ckpt_dir):
            if s > step:
                target = _invalid_path(ckpt_dir, s)
                (Path(ckpt_dir) / str(s)).rename(target)
                moved.append(target.name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("spmd: invalid steps set aside")
    return moved


def _invalid_path(ckpt_dir: str, step: int) -> Path:
    target, n = Path(ckpt_dir) / f"{step}.invalid", 1
    while target.exists():
        target, n = Path(ckpt_dir) / f"{step}.invalid{n}", n + 1
    return target


def _restore_items(ckpt_dir: str, step: int, **targets) -> dict:
    """Restore array items into abstract targets (whose shardings say where each slice goes).

    Each process reads only its own slices, with no barrier: processes share their verdicts
    afterwards (`restore_with_fallback`), and one that failed mid-read must not leave the
    others waiting in orbax's barrier.
    """
    ocp = _ocp()
    ckpt_quiet.install()
    me = jax.process_index()
    args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    with _quiet_read_only_notices():  # the options log them when they are made
        options = ocp.CheckpointManagerOptions(
            read_only=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            ),
        )
        with ocp.CheckpointManager(str(Path(ckpt_dir).absolute()), options=options) as manager:
            restored = manager.restore(step, args=ocp.args.Composite(**args))
    return {k: restored[k] for k in targets}


@contextlib.contextmanager
def _quiet_read_only_notices():
    """orbax logs three absl warnings for every read-only manager, which is what we asked
    for; they would reach every `spmd generate` user as noise."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def restore_train_state(ckpt_dir: str, abstract_state, step: int | None = None, set_aside=False):
    """`(step, TrainState, meta, config)` from the newest valid step, or None if none exists.

    `abstract_state` is a TrainState of ShapeDtypeStructs carrying the target shardings.
    """

    def restore(s: int):  # no collectives in here: processes may be on different paths
        items = _restore_items(
            ckpt_dir, s, params=abstract_state.params, opt_state=abstract_state.opt_state
        )
        return items, *(_read_json(ckpt_dir, s, item) for item in JSON_ITEMS)

    found = restore_with_fallback(ckpt_dir, restore, step, set_aside)
    if found is None:
        return None
    s, (items, meta, config) = found
    step_array = jax.device_put(np.int32(meta["step"]), abstract_state.step.sharding)
    state = type(abstract_state)(step=step_array, **items)
    return s, state, meta, config


def restore_params(ckpt_dir: str, model, layout, step: int | None = None):
    """Only the parameters, restored straight onto `layout` (the newest valid step by
    default)."""
    if not Path(ckpt_dir).is_dir():
        raise SpmdError(f"checkpoint directory {ckpt_dir} does not exist")
    target = layout.abstract_params(model.specs())
    found = restore_with_fallback(
        ckpt_dir, lambda s: _restore_items(ckpt_dir, s, params=target)["params"], step
    )
    if found is None:
        raise SpmdError(f"{ckpt_dir} holds no checkpoint")
    return found[1]


class CouldNotVerify(SpmdError):
    """Reading a step failed for a reason that says nothing against it (see ckpt_faults)."""


VERIFY_BLOCK_BYTES = 64 << 20  # the most that verifying holds in memory at once


def verify_step(ckpt_dir: str, step: int) -> str | None:
    """Like `step_problem`, but also reads every array's bytes (catches truncation).

    It reads straight from the files with tensorstore, one array and at most
    VERIFY_BLOCK_BYTES at a time, on no device. Raises CouldNotVerify if reading fails for
    a reason that is no verdict on the step (out of memory, no permission, EIO).
    """
    try:
        problem = step_problem(ckpt_dir, step)
        if problem:
            return problem
        for item in ARRAY_ITEMS:
            _read_every_array(Path(ckpt_dir).absolute() / str(step) / item)
    except Exception as e:  # tensorstore raises many kinds; ckpt_faults sorts them
        reason, line = ckpt_faults.not_corruption(e), ckpt_faults.first_line(e)
        if reason:
            raise CouldNotVerify(f"{reason}: {line}") from None
        return f"reading it failed: {line}"
    return None


def _read_every_array(item_dir: Path) -> None:
    import tensorstore as ts

    json.loads((item_dir / "_METADATA").read_text())
    kvstore = {"driver": "ocdbt", "base": f"file://{item_dir}/"}
    for key in sorted(ts.KvStore.open(kvstore).result().list().result()):
        name, _, leaf = key.decode().rpartition("/")
        driver = {".zarray": "zarr", "zarr.json": "zarr3"}.get(leaf)
        if name and driver:
            spec = {
                "driver": driver,
                "kvstore": {**kvstore, "path": f"{name}/"},
                "fill_missing_data_reads": False,  # a missing chunk is damage, not zeros
            }
            _read_in_blocks(ts.open(spec, open=True, read=True).result())


def _read_in_blocks(array) -> None:
    if array.ndim == 0 or array.shape[0] == 0:
        array.read().result()
        return
    row_bytes = array.dtype.numpy_dtype.itemsize * int(np.prod(array.shape[1:]))
    rows = max(1, VERIFY_BLOCK_BYTES // max(1, row_bytes))
    for start in range(0, array.shape[0], rows):
        array[start : min(start + rows, array.shape[0])].read().result()  # no clamping
