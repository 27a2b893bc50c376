"""Saving: the Checkpointer, its asynchronous writes, and failures that name their step."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from spmd.checkpoint import faults
from spmd.checkpoint.steps import all_steps, orbax_checkpoint, step_problem
from spmd.errors import SaveFailed, SpmdError


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
        ocp = orbax_checkpoint()
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
        ocp = orbax_checkpoint()
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
    root = faults.causes(e)[-1]  # guards against a cause chain that loops
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    return faults.first_line(root)


def _intact(ckpt_dir: str, failed: int) -> str:
    steps = [s for s in all_steps(ckpt_dir) if s != failed and step_problem(ckpt_dir, s) is None]
    if not steps:
        return "no earlier step is intact"
    names = ", ".join(map(str, steps))
    return f"step {names} is intact" if len(steps) == 1 else f"steps {names} are intact"
