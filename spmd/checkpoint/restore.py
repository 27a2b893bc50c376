"""Restoring: the newest step every process can read, straight onto the target shardings."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from spmd.checkpoint import faults, quiet
from spmd.checkpoint.steps import (
    JSON_ITEMS,
    all_steps,
    orbax_checkpoint,
    read_json,
    step_problem,
    warn,
)
from spmd.distributed import allgather_int, is_main_process
from spmd.errors import SpmdError

OK, CORRUPT, FAILED = 0, 1, 2  # one process's verdict on one step, shared with the others


def restore_with_fallback(
    ckpt_dir: str, restore: Callable[[int], Any], step: int | None = None, set_aside=False
):
    """`(step, restore(step))` for the newest step that restores, one warning per corrupt
    step skipped. `restore` must not run collectives: processes may disagree on a step.

    Returns None if there is no step folder at all; raises SpmdError if no step restores,
    or at once, with every folder as it was, for a failure that says nothing against the
    step's bytes (see `spmd.checkpoint.faults`). With `step` given, only that step is tried. In a
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
    except Exception as e:  # orbax and tensorstore raise many kinds; faults sorts them
        reason, line = faults.not_corruption(e), faults.first_line(e)
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


def restore_items(ckpt_dir: str, step: int, partial: bool = False, **targets) -> dict:
    """Restore array items into abstract targets (whose shardings say where each slice goes).

    Each process reads only its own slices, with no barrier: processes share their verdicts
    afterwards (`restore_with_fallback`), and one that failed mid-read must not leave the
    others waiting in orbax's barrier. `partial`: a target may name only some of an item's
    arrays (to read a checkpoint one parameter at a time).
    """
    ocp = orbax_checkpoint()
    quiet.install()
    me = jax.process_index()
    if partial:
        args = {
            k: ocp.args.PyTreeRestore(
                item=v,
                restore_args=ocp.checkpoint_utils.construct_restore_args(v),
                partial_restore=True,
            )
            for k, v in targets.items()
        }
    else:
        args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    with quiet_read_only_notices():  # the options log them when they are made
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
def quiet_read_only_notices():
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
        items = restore_items(
            ckpt_dir, s, params=abstract_state.params, opt_state=abstract_state.opt_state
        )
        return items, *(read_json(ckpt_dir, s, item) for item in JSON_ITEMS)

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
        ckpt_dir, lambda s: restore_items(ckpt_dir, s, params=target)["params"], step
    )
    if found is None:
        raise SpmdError(f"{ckpt_dir} holds no checkpoint")
    return found[1]
