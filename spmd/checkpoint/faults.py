"""Why a checkpoint step failed to restore: is the step corrupt, or was it the machine?

A corrupt step is skipped and set aside (renamed `<step>.invalid`), and the run falls back
to the step before. Setting aside a good step because the machine ran out of memory or a
network filesystem hiccuped would throw away a checkpoint for nothing, so this is the one
place that decides, and it is conservative: a failure is corruption only when nothing in
its chain of causes says otherwise and its root cause is one of these kinds:

  corrupt (fall back)
    tensorstore statuses about the bytes on disk: DATA_LOSS, OUT_OF_RANGE (a truncated
    file), NOT_FOUND (a missing file), FAILED_PRECONDITION (undecodable data) and
    INVALID_ARGUMENT; FileNotFoundError; a JSON or UTF-8 error (a damaged metadata file).

  not corrupt (stop the run with one line, every step folder left as it was)
    out of memory: MemoryError, RESOURCE_EXHAUSTED (XLA or tensorstore), ENOMEM, ENOSPC
    no permission: PermissionError, PERMISSION_DENIED, EACCES, EPERM, EROFS
    passing trouble: TimeoutError, ConnectionError (both OSErrors), EIO, ESTALE, ETIMEDOUT,
      EAGAIN, EBUSY, EINTR; tensorstore's UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, CANCELLED
    an OS error of any other kind, even wrapped in a corrupt-looking status
    anything else: an unforeseen failure is not proof that the bytes are bad.

tensorstore raises its statuses as ValueError("CODE: ..."), and orbax wraps them in a bare
Exception, so the kind is read from each cause's class and the text's leading status code.
"""

from __future__ import annotations

import errno
import json
import re

CORRUPT_STATUSES = frozenset(
    {"DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT"}
)
RESOURCE_STATUSES = {
    "RESOURCE_EXHAUSTED": "out of memory or another resource",
    "PERMISSION_DENIED": "permission denied",
    "UNAUTHENTICATED": "permission denied",
    "UNAVAILABLE": "the storage was unavailable",
    "DEADLINE_EXCEEDED": "reading timed out",
    "ABORTED": "reading was aborted",
    "CANCELLED": "reading was cancelled",
}
MEMORY_ERRNOS = {errno.ENOMEM, errno.ENOSPC}
PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
_STATUS = re.compile(r"^\s*([A-Z_]{4,}):")
_OS_ERROR = re.compile(r"\[?OS error\b")


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first, root cause last."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) and nxt not in chain:
        chain.append(nxt)
    return chain


def first_line(exc: BaseException) -> str:
    """The root cause's first line: tensorstore's own words, not orbax's wrapper."""
    root = causes(exc)[-1]
    text = str(root).strip().splitlines()
    return (text[0] if text else type(root).__name__)[:240]


def not_corruption(exc: BaseException) -> str | None:
    """Why `exc` says nothing against the step's bytes (see the table above), or None if
    it is corruption."""
    chain = causes(exc)
    for e in chain:
        reason = _machine_trouble(e)
        if reason:
            return reason
    if _is_corrupt(chain[-1]):
        return None
    return "an unexpected error"


def _machine_trouble(e: BaseException) -> str | None:
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        if isinstance(e, PermissionError) or e.errno in PERMISSION_ERRNOS:
            return "permission denied"
        if e.errno in MEMORY_ERRNOS:
            return "out of memory or disk space"
        return "a filesystem error"  # EIO, ESTALE, timeouts: may pass; the step may be fine
    text = str(e)
    status = _STATUS.match(text)
    if status and status.group(1) in RESOURCE_STATUSES:
        return RESOURCE_STATUSES[status.group(1)]
    if _OS_ERROR.search(text) and "No such file or directory" not in text:
        return "a filesystem error"
    return None


def _is_corrupt(root: BaseException) -> bool:
    if isinstance(root, FileNotFoundError | json.JSONDecodeError | UnicodeDecodeError):
        return True
    status = _STATUS.match(str(root))
    return bool(status) and status.group(1) in CORRUPT_STATUSES
