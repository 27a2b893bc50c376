"""One run per checkpoint folder: `<ckpt-dir>/.spmd-lock`, held for the whole run.

Two runs saving into one folder would overwrite each other's steps and garbage-collect each
other's checkpoints, so a second `spmd train` on a held folder is refused before it compiles
anything.

The lock is `fcntl.flock` on an open file rather than a file created with O_CREAT|O_EXCL.
The kernel drops a flock when its holder dies, however it dies (SIGKILL, the OOM killer), so
whether the holder is alive is never guessed from a pid that another process may since have
reused, and a crashed run never leaves a lock that needs removing by hand. The file's JSON
(pid, host, start time) only names the holder in messages; a file that is there but not
locked was left by a run that died, and is taken over with a warning. Local filesystems and
NFSv4 honour flock across processes; a network filesystem without it gets a warning instead.

In a multi-process job only the main process takes the lock: it is the one that owns the
folder's single-writer files, and the other processes fail with it if it is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from spmd.distributed import is_main_process
from spmd.errors import SpmdError

LOCK_NAME = ".spmd-lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock(contextlib.AbstractContextManager):
    """Holds `<ckpt_dir>/.spmd-lock` from `__enter__` to `__exit__`; no-op without a folder."""

    def __init__(self, ckpt_dir: str | None):
        self.path = Path(ckpt_dir) / LOCK_NAME if ckpt_dir and is_main_process() else None
        self._fd: int | None = None
        self._made_folder = False

    def __enter__(self):
        if self.path is not None:
            self._make_folder()
            self._fd = self._take()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def _make_folder(self) -> None:
        folder = self.path.parent
        self._made_folder = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpmdError(f"--ckpt-dir {folder}: cannot create it ({e.strerror})") from None

    def _take(self) -> int | None:
        while True:
            fd = _open(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise SpmdError(
                    f"--ckpt-dir {self.path.parent} is in use by another run ({holder}); "
                    "let it finish or stop it, or choose another directory"
                ) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _UNSUPPORTED:
                    raise
                _warn(f"{self.path.parent} cannot be locked ({e.strerror}); nothing stops a "
                      "second run from saving into it")  # fmt: skip
                return None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and our lock
        self._claim(fd)
        return fd

    def _claim(self, fd: int) -> None:
        """Record who holds the lock, warning if a dead run's record was still there."""
        stale = _read(fd)
        if stale is not None:
            _warn(f"taking over the lock in {self.path.parent} left by a run that died "
                  f"({_describe(stale)})")  # fmt: skip
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the file while still holding the lock, so a waiting run never locks a file
        that is no longer the folder's lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):  # the folder may be gone; the lock goes with fd
            if _same_file(fd, self.path):
                self.path.unlink()
            if self._made_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # nothing was saved: leave no empty folder behind
        os.close(fd)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise SpmdError(
            f"--ckpt-dir {path.parent}: cannot create {path.name} ({e.strerror})"
        ) from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read(fd: int) -> dict | None:
    """The record in the file; {} if it is there but unreadable, None if the file is empty."""
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict | None) -> str:
    if not record:
        return "holder unknown"
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, since " + str(
        record.get("started", "?")
    )


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def _warn(msg: str) -> None:
    print(f"spmd: warning: {msg}", file=sys.stderr, flush=True)
