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

With ``--nats URL --stream NAME`` instead of ``--data-dir``, the store is a
NATS-backed one: ``kvd.audit.nats_source`` exports the stream and its
snapshots into a directory laid out as a data directory (temporary, or
``--keep-export DIR``) and the command runs on that, unchanged. ``compact``
and ``repair`` exit 2 there: they would change the shared stream.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kvd.audit import compact, dump, history, repair, replay, stats, verify
from kvd.audit.base import EXIT_FAILURE, EXIT_INCONCLUSIVE, AuditError, Inconclusive, error, note
from kvd.config import Config
from kvd.log.history import HistoryGone
from kvd.log.reader import JournalCorrupt
from kvd.log.snapshot import SnapshotCorrupt

if TYPE_CHECKING:
    from kvd.audit.nats_source import ExportSummary

ACTIONS: dict[str, Callable[[Path, argparse.Namespace, Config], int]] = {
    "dump": dump.run,
    "verify": verify.run,
    "replay": replay.run,
    "history": history.run,
    "stats": stats.run,
    "compact": compact.run,
    "repair": repair.run,
}


EXIT_USAGE = 2

# Why the commands that change a store refuse a NATS-backed one (exit 2).
NOT_ON_NATS = {
    "compact": (
        "kvd journal compact does not work with --nats: the running kvd nodes compact the "
        "shared stream themselves (and on POST /journal/compact); an auditor's tool does not "
        "change it"
    ),
    "repair": (
        "kvd journal repair does not work with --nats: cutting records out of the shared "
        "stream is not supported. Export it with `kvd journal verify --nats URL --stream NAME "
        "--keep-export DIR`, then inspect DIR (`kvd journal repair --dry-run --data-dir DIR` "
        "shows what a repair of that copy would cut)"
    ),
}


def run(config: Config, args: argparse.Namespace) -> int:
    """Run one ``kvd journal`` action; returns the exit status."""
    if getattr(args, "nats", None):
        return _run_nats(config, args)
    for flag, value in (("--stream", getattr(args, "stream", None)),
                        ("--keep-export", getattr(args, "keep_export", None))):
        if value is not None:
            error(f"{flag} needs --nats URL (it names what to read from NATS)")
            return EXIT_USAGE
    directory = config.data_dir
    if not directory.is_dir():
        error(f"no data directory at {directory}")
        return EXIT_FAILURE
    return _run_action(ACTIONS[args.journal_command], directory, args, config)


def _run_nats(config: Config, args: argparse.Namespace) -> int:
    """Export the stream into a data directory, run the action there, and remove it unless kept."""
    from kvd.audit import nats_source

    refusal = NOT_ON_NATS.get(args.journal_command)
    if refusal is not None:
        error(refusal)
        return EXIT_USAGE
    servers = [url.strip() for value in args.nats for url in value.split(",") if url.strip()]
    if not servers:
        error("--nats needs a URL such as nats://127.0.0.1:4222")
        return EXIT_USAGE
    stream = args.stream or config.journal.nats.stream
    keep = Path(args.keep_export) if args.keep_export is not None else None
    try:
        with nats_source.exported(servers, stream, keep) as summary:
            kept = "" if keep is not None else " (removed afterwards; --keep-export DIR keeps it)"
            note(summary.describe() + kept)
            action = ACTIONS[args.journal_command]
            if args.journal_command == "verify":
                action = nats_source.verify_action(summary)
            return _run_action(action, summary.directory, args, config, summary)
    except AuditError as exc:
        error(str(exc))
        return EXIT_FAILURE


def _run_action(
    action: Callable[[Path, argparse.Namespace, Config], int],
    directory: Path,
    args: argparse.Namespace,
    config: Config,
    export: ExportSummary | None = None,
) -> int:
    try:
        return action(directory, args, config)
    except Inconclusive as exc:
        error(str(exc))
        return EXIT_INCONCLUSIVE
    except AuditError as exc:
        error(str(exc))
        return EXIT_FAILURE
    except (JournalCorrupt, SnapshotCorrupt) as exc:
        error(f"{exc}; `kvd journal verify` shows what is damaged")
        if export is not None and isinstance(exc, JournalCorrupt):
            where = export.where(exc.path, exc.offset)
            if where:
                note(where)
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


