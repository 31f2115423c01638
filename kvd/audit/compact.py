"""``kvd journal compact``: compact a stopped store, as a running server does by itself."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvd.audit.base import EXIT_OK, counted, lock_for_writing
from kvd.config import Config
from kvd.log.history import ARCHIVE_DIR


def run(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """Replay, snapshot and retire segments under the lock, with the server's own settings."""
    from kvd.log.compaction import compact_stopped
    from kvd.log.file import FileJournal
    from kvd.store import Store

    lock = lock_for_writing(directory, "a running server compacts by itself, or on POST /journal/compact")
    try:
        store = Store()
        journal = FileJournal(
            directory,
            fsync=config.journal.fsync,
            segment_bytes=config.journal.segment_bytes,
            archive=config.journal.archive,
            on_commit=store.apply,
            on_restore=store.restore,
            on_replay_puts=store.replay_puts,
        )
        try:
            journal.replay()
            store.finish_replay()
            report = compact_stopped(journal, store)
            archived = journal.archive  # also on when an archive/ already exists
        finally:
            journal.close_sync()
    finally:
        lock.release()
    if report.segments_retired == 0 and report.bytes_before == report.bytes_after:
        print(f"nothing to compact: the newest snapshot already holds the state at seq {report.seq}")
        return EXIT_OK
    where = f"moved to {directory / ARCHIVE_DIR}" if archived else "deleted"
    print(
        f"compacted: snapshot of {report.keys} keys at seq {report.seq}; "
        f"{counted(report.segments_retired, 'segment')} {where}; "
        f"{report.bytes_before} -> {report.bytes_after} bytes in {report.seconds:.2f}s"
    )
    return EXIT_OK

