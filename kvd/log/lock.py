"""One server per data directory: an exclusive flock on ``<data_dir>/LOCK``.

The kernel drops the lock when the process dies, so a crash never leaves a
stale lock behind. Read-only tools (``kvd journal ...``) do not take it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "LOCK"


class DataDirLocked(Exception):
    """Another process holds the data directory."""


class DataDirLock:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text(encoding="ascii", errors="replace").strip() or "?"
            raise DataDirLocked(
                f"data directory {self.path.parent} is in use by another kvd (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
