"""SIGINT and SIGTERM ask the training loop to stop cleanly instead of killing it.

The handler only sets a flag; the loop finishes the step it is on, saves a checkpoint and
exits 0. A second SIGINT raises KeyboardInterrupt at once, for a run that must die now.
"""

from __future__ import annotations

import contextlib
import signal


class StopFlag(contextlib.AbstractContextManager):
    """SIGINT/SIGTERM -> `signal` is set; a second SIGINT interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
