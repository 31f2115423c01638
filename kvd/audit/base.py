"""What every ``kvd journal`` command shares: exit codes, errors, stderr notes, the lock."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kvd.log.format import format_ts
from kvd.log.lock import DataDirLock, DataDirLocked

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INCONCLUSIVE = 3  # verify could not check: not "damaged" (1), which scripts act on


class AuditError(Exception):
    """A command cannot do what was asked; the message says why (exit 1)."""


class Inconclusive(AuditError):
    """Nothing was found wrong, but the check could not finish (exit 3)."""


def error(message: str) -> None:
    """Say on stderr why the command failed."""
    print(f"kvd: error: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """Say on stderr what the output leaves out, keeping stdout clean for pipes."""
    print(f"kvd: {message}", file=sys.stderr, flush=True)


def record_ts(moment: float) -> str:
    """A time in the records' own ``ts`` form, so the two compare as strings."""
    return format_ts(moment)


def counted(number: int, noun: str) -> str:
    """``1 segment``, ``3 segments``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def lock_for_writing(directory: Path, hint: str) -> DataDirLock:
    """The data directory's lock, or AuditError: this must not run beside a server."""
    lock = DataDirLock(directory)
    try:
        lock.acquire()
    except DataDirLocked as exc:
        raise AuditError(f"{exc}; stop the server first ({hint})") from None
    return lock


def file_size(path: Path) -> int:
    """0 for a file that is gone: compaction may retire it while a command reads."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
