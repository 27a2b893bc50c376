"""SIGINT and SIGTERM ask the training loop to stop cleanly instead of killing it.

The handler only sets a flag; the loop finishes the step it is on, saves a checkpoint and
exits 0. The handlers stay installed until that last save is on disk: schedulers often send
SIGTERM more than once, and a second one during the final wait must not cut the save short,
so it only prints that the save is still going. A second SIGINT raises KeyboardInterrupt at
once, for a run that must die now: the save in flight may then be lost, while earlier steps
stay intact and `--resume` falls back past a half-written one.
"""

from __future__ import annotations

import contextlib
import signal
import sys


class StopFlag(contextlib.AbstractContextManager):
    """SIGINT/SIGTERM -> `signal` is set; a second SIGINT interrupts at once.

    Set `saving` to the step being written while the run waits for its last save: a signal
    then only reports that wait (the run is ending anyway).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self.saving: int | None = None
        self._previous = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is None and self.saving is None:
            self.signal = signum
        else:
            print(self._still_busy(), file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _still_busy(self) -> str:
        what = "stopping" if self.saving is None else f"saving step {self.saving}"
        return (
            f"spmd: still {what}; the run exits when the checkpoint is written (SIGINT abandons it)"
        )

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
