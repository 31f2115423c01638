"""``kvd journal ...``: audit and maintenance tools over one data directory.

``dump``, ``verify``, ``replay``, ``history`` and ``stats`` only read: they
take no lock and write nothing, so they are safe on a live server's
directory (a segment that compaction moves meanwhile is looked for again; a
torn last line is a write in progress). ``compact`` and ``repair`` change the
directory, so they take its lock and refuse while a server holds it.

Exit status: 0 done (verify: intact), 1 failed (damage, a point older than
the retained history, a directory in use or missing), 2 usage (argparse).
Memory: replaying commands hold one state of the store (as the server
does); ``verify`` holds one more snapshot's entries while comparing.
Progress goes to stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kvd.audit import compact, dump, history, repair, replay, stats, verify
from kvd.audit.base import EXIT_FAILURE, AuditError, error
from kvd.config import Config
from kvd.log.history import HistoryGone
from kvd.log.reader import JournalCorrupt
from kvd.log.snapshot import SnapshotCorrupt

ACTIONS: dict[str, Callable[[Path, argparse.Namespace, Config], int]] = {
    "dump": dump.run,
    "verify": verify.run,
    "replay": replay.run,
    "history": history.run,
    "stats": stats.run,
    "compact": compact.run,
    "repair": repair.run,
}


def run(config: Config, args: argparse.Namespace) -> int:
    """Run one ``kvd journal`` action; returns the exit status."""
    directory = config.data_dir
    try:
        if not directory.is_dir():
            raise AuditError(f"no data directory at {directory}")
        return ACTIONS[args.journal_command](directory, args, config)
    except AuditError as exc:
        error(str(exc))
        return EXIT_FAILURE
    except (JournalCorrupt, SnapshotCorrupt) as exc:
        error(f"{exc}; `kvd journal verify` shows what is damaged")
        return EXIT_FAILURE
    except HistoryGone as exc:
        error(f"{exc} (`kvd journal stats` shows the oldest retained point)")
        return EXIT_FAILURE
    except FileNotFoundError as exc:
        # A live server's compaction retired a file between listing and reading it.
        error(f"{exc.filename} went away while reading (a compaction ran?); run the command again")
        return EXIT_FAILURE
    except BrokenPipeError:
        # Whoever read our output stopped (`kvd journal dump | head`): not worth a
        # traceback. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


