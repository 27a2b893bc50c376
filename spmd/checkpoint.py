"""Sharded checkpoints with orbax: asynchronous saves, validated restores, resharding.

A checkpoint step folder holds four orbax items: `params` and `opt_state` (sharded arrays,
written by every process), `meta` (the step, the data iterator state and the RNG, as JSON)
and `config` (the run's TrainConfig, as JSON). Nothing is pickled, so loading a checkpoint
never runs code.

Restores go straight into the target shardings: the abstract arrays handed to orbax carry
the new mesh's shardings, so each device reads only its own slices, whatever mesh wrote them.

Orbax lists any step folder, even an empty or half-written one, as a step, and a truncated
data file only shows when it is read. So every step is checked before it is trusted, and a
restore that fails falls back to the previous step with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from spmd.distributed import is_main_process
from spmd.errors import SaveFailed, SpmdError

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

    This reads only metadata; a truncated array file shows when the arrays are read.
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
        except (OSError, ValueError):
            return f"item {item!r} is missing or not JSON"
    return None


def latest_valid_step(ckpt_dir: str) -> int | None:
    """The newest step whose folder is whole (see `step_problem`), or None."""
    for step in reversed(all_steps(ckpt_dir)):
        if step_problem(ckpt_dir, step) is None:
            return step
    return None


def read_json_item(ckpt_dir: str, step: int, item: str) -> dict:
    path = Path(ckpt_dir) / str(step) / item / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise SpmdError(f"checkpoint {ckpt_dir} step {step}: {item} is unreadable") from None


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
    """Saves every `every` steps (asynchronously unless `async_save=False`), keeping `keep`.

    A save that fails (a full disk, a folder that went away) raises SpmdError naming its own
    step, even when an asynchronous write only reports it at the next save or the final wait,
    and says which earlier steps are intact. orbax logs the same failure with tracebacks from
    its threads; those are silenced while a Checkpointer is open, since the SpmdError says it.
    """

    def __init__(self, ckpt_dir: str, every: int, keep: int, async_save: bool = True):
        if every < 1 or keep < 1:
            raise SpmdError(f"--ckpt-every={every} and --keep={keep} must be positive")
        ocp = _ocp()
        self.directory, self.every = str(Path(ckpt_dir).absolute()), every
        self.async_save = async_save
        self.in_flight: int | None = None  # the step an asynchronous write is busy with
        self.failed: int | None = None
        self._quiet = _DropTracebacks()
        logging.getLogger("absl").addFilter(self._quiet)
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
        self.wait()  # the previous write's failure is that step's, not this one's
        with self._reporting(step):
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
        self.in_flight = step if self.async_save else None

    def wait(self) -> None:
        if self.in_flight is None:
            return
        step, self.in_flight = self.in_flight, None
        with self._reporting(step):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save (raising if it failed), then stops orbax's threads."""
        try:
            self.wait()
        finally:
            # After a failure orbax raises it again, and its threads may still log at exit.
            with contextlib.suppress(Exception) if self.failed else contextlib.nullcontext():
                self.manager.close()
            if self.failed is None:
                logging.getLogger("absl").removeFilter(self._quiet)

    @contextlib.contextmanager
    def _reporting(self, step: int):
        """orbax and tensorstore raise many kinds (OSError, ValueError, RuntimeError) for one
        failed write; each becomes the one line that names the step and what survived."""
        try:
            yield
        except SpmdError:
            raise
        except Exception as e:
            self.failed, self.in_flight = step, None
            raise SaveFailed(
                f"saving checkpoint step {step} to {self.directory} failed: {_reason(e)}; "
                f"{_intact(self.directory, step)}"
            ) from None


class _DropTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= logging.ERROR)


def _reason(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return _first_line(e)


def _intact(ckpt_dir: str, failed: int) -> str:
    steps = [s for s in all_steps(ckpt_dir) if s != failed and step_problem(ckpt_dir, s) is None]
    if not steps:
        return "no earlier step is intact"
    names = ", ".join(map(str, steps))
    return f"step {names} is intact" if len(steps) == 1 else f"steps {names} are intact"


# ----------------------------------------------------------------------------- restoring


def restore_with_fallback(ckpt_dir: str, restore: Callable[[int], Any], step: int | None = None):
    """`(step, restore(step))` for the newest step that restores, warning for each that fails.

    Returns None if there is no step folder at all; raises SpmdError if none restores. With
    `step` given, only that step is tried.
    """
    steps = all_steps(ckpt_dir) if step is None else [step]
    if not steps:
        return None
    failures = []
    for candidate in reversed(steps):
        problem = step_problem(ckpt_dir, candidate)
        if problem is None:
            try:
                return candidate, restore(candidate)
            except Exception as e:  # orbax/tensorstore raise many kinds for bad data
                problem = f"reading it failed: {_first_line(e)}"
        failures.append(candidate)
        rest = [s for s in steps if s < candidate]
        then = f"falling back to step {rest[-1]}" if rest else "no earlier step to fall back to"
        warn(f"checkpoint step {candidate} in {ckpt_dir} is not valid ({problem}); {then}")
    raise SpmdError(
        f"{ckpt_dir} holds no valid checkpoint (steps {', '.join(map(str, failures))} "
        "are all incomplete or corrupt)"
    )


def set_aside_newer(ckpt_dir: str, step: int) -> list[str]:
    """Rename step folders newer than `step` (all invalid, or the restore would have used
    them) to `<step>.invalid`, so the resumed run can save those steps again."""
    moved = []
    if is_main_process():
        for s in all_steps(ckpt_dir):
            if s > step:
                target = Path(ckpt_dir) / f"{s}.invalid"
                n = 1
                while target.exists():
                    target, n = Path(ckpt_dir) / f"{s}.invalid{n}", n + 1
                (Path(ckpt_dir) / str(s)).rename(target)
                moved.append(target.name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("spmd: invalid steps set aside")
    return moved


def _first_line(e: BaseException) -> str:
    """The root cause's first line: tensorstore's own words, not orbax's wrapper."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:240]


def _restore_items(ckpt_dir: str, step: int, **targets) -> dict:
    """Restore array items into abstract targets (whose shardings say where each slice goes)."""
    ocp = _ocp()
    args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    with (
        _quiet_read_only_notices(),
        ocp.CheckpointManager(
            str(Path(ckpt_dir).absolute()), options=ocp.CheckpointManagerOptions(read_only=True)
        ) as manager,
    ):
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


def restore_train_state(ckpt_dir: str, abstract_state, step: int | None = None):
    """`(step, TrainState, meta, config)` from the newest valid step, or None if none exists.

    `abstract_state` is a TrainState of ShapeDtypeStructs carrying the target shardings.
    """

    def restore(s: int):
        items = _restore_items(
            ckpt_dir, s, params=abstract_state.params, opt_state=abstract_state.opt_state
        )
        meta = read_json_item(ckpt_dir, s, "meta")
        step_array = jax.device_put(np.int32(meta["step"]), abstract_state.step.sharding)
        state = type(abstract_state)(
            step=step_array, params=items["params"], opt_state=items["opt_state"]
        )
        return state, meta, read_json_item(ckpt_dir, s, "config")

    found = restore_with_fallback(ckpt_dir, restore, step)
    if found is None:
        return None
    s, (state, meta, config) = found
    return s, state, meta, config


def restore_params(ckpt_dir: str, model, mesh, rules=None, step: int | None = None):
    """Only the parameters, restored straight onto `mesh` (the newest valid step by default)."""
    from spmd import params as P

    if not Path(ckpt_dir).is_dir():
        raise SpmdError(f"checkpoint directory {ckpt_dir} does not exist")
    target = P.abstract_sharded(model.specs(), mesh, rules)
    found = restore_with_fallback(
        ckpt_dir, lambda s: _restore_items(ckpt_dir, s, params=target)["params"], step
    )
    if found is None:
        raise SpmdError(f"{ckpt_dir} holds no checkpoint")
    return found[1]


def verify_step(ckpt_dir: str, step: int) -> str | None:
    """Like `step_problem`, but also reads every array to host memory (catches truncation)."""
    problem = step_problem(ckpt_dir, step)
    if problem:
        return problem
    ocp = _ocp()
    path = Path(ckpt_dir).absolute() / str(step)
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            targets = {
                item: jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                    ckptr.metadata(path / item).item_metadata.tree,
                )
                for item in ARRAY_ITEMS
            }
        for item, target in targets.items():  # one item at a time bounds the memory used
            jax.block_until_ready(_restore_items(ckpt_dir, step, **{item: target}))
    except Exception as e:  # the same failures a real restore would hit
        return f"reading it failed: {_first_line(e)}"
    return None
