"""Silence the aftermath of a checkpoint restore that failed, and only that.

orbax restores a step by gathering hundreds of tensorstore reads in a fresh asyncio event
loop. When one read fails (a truncated file), the gather raises at once and orbax closes
the loop while the other reads are still in flight. Nothing is wrong with that for us: the
step is skipped. But the abandoned reads then report, one by one and at unpredictable
moments (when a read finishes on a tensorstore thread, or when the garbage collector finds
its coroutine), through two channels that print to stderr:

- `sys.unraisablehook`: `RuntimeError: Event loop is closed` from each tensorstore callback
  that tries to wake the closed loop, and the coroutine of each abandoned read, which orbax
  rewraps on close into an `Exception` with a multi-line TensorStore spec;
- the `asyncio` logger: "Future exception was never retrieved" for reads that failed too.

A thousand lines of that hide the one warning that matters. These filters drop exactly
those records and pass everything else on. They stay installed for the process, because
the last abandoned read may report long after the restore returned.
"""

from __future__ import annotations

import logging
import sys

_ORBAX_WORDS = ("orbax", "tensorstore", "TensorStore", "OCDBT")
_ASYNCIO_NOTICES = (
    "exception was never retrieved",
    "Task was destroyed but it is pending",
)


def install() -> None:
    """Install both filters (again, if something replaced the hook since)."""
    if not getattr(sys.unraisablehook, "spmd_quiet", False):
        sys.unraisablehook = _filtered(sys.unraisablehook)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReads) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedReads())


def is_abandoned_read(unraisable) -> bool:
    """True for the unraisable exceptions an abandoned orbax read leaves behind."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return _from_asyncio_wakeup(unraisable.exc_traceback)
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine being finalized
    return code is not None and "orbax" in code.co_filename


def _from_asyncio_wakeup(tb) -> bool:
    """Raised in asyncio's `call_soon_threadsafe`, called from outside Python (tensorstore)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return bool(frames) and frames[0] == "call_soon_threadsafe"


def _filtered(previous):
    def hook(unraisable):
        if not is_abandoned_read(unraisable):
            previous(unraisable)

    hook.spmd_quiet = True
    return hook


class _AbandonedReads(logging.Filter):
    """Drops asyncio's notices about futures of failed orbax/tensorstore reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(notice in message for notice in _ASYNCIO_NOTICES):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        text = f"{message} {exc!r}"
        return not any(word in text for word in _ORBAX_WORDS)
