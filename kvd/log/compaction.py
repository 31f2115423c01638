"""Compaction: write a snapshot of the live state, then retire the segments it replaces.

Online, the steps are split between the event loop and threads so that
requests keep being served and writes keep landing:

1. on the loop, at a quiet point of the journal (``request_cut``): take the
   state after seq S as a consistent copy (a shallow dict copy; entries are
   replaced, never changed in place) and make the next record start a new
   segment;
2. on a worker thread: write the snapshot (temp file, fsync, rename, fsync
   directory);
3. on the journal thread: delete or archive the segments holding only
   records up to S, and the previous snapshot.

A crash at any step leaves a directory start-up can load: before step 2
completes there is no new snapshot and every segment is still there; after
it, start-up loads the new snapshot and finishes step 3 itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kvd.log import faults
from kvd.log.file import FileJournal
from kvd.log.snapshot import SnapshotHeader, snapshot_name, write_snapshot
from kvd.model import Entry

log = logging.getLogger("kvd.journal")

# A snapshot line costs about this much beyond its key and value ({"k":,"r":,"v":}).
ENTRY_OVERHEAD_BYTES = 24


@dataclass(frozen=True)
class CompactionPolicy:
    dead_ratio: float = 1.0
    min_dead_bytes: int = 16 * 1024 * 1024

    def due(self, disk_bytes: int, live_bytes: int) -> bool:
        """Dead bytes (on disk beyond what a snapshot of the live state takes) over both limits."""
        dead = disk_bytes - live_bytes
        return dead >= self.min_dead_bytes and dead > self.dead_ratio * live_bytes


@dataclass(frozen=True)
class CompactionReport:
    seq: int
    keys: int
    segments_retired: int
    bytes_before: int
    bytes_after: int
    seconds: float


def live_estimate(entries: dict[str, Entry], live_bytes: int) -> int:
    """What a snapshot of the live state takes, roughly: keys, values and per-line framing."""
    return live_bytes + ENTRY_OVERHEAD_BYTES * len(entries)


class Compactor:
    """Runs one compaction at a time for a serving store."""

    def __init__(self, journal: FileJournal, store, policy: CompactionPolicy) -> None:  # noqa: ANN001
        self.journal = journal
        self.store = store
        self.policy = policy
        self.running = False

    def due(self) -> bool:
        estimate = live_estimate(self.store.committed_entries(), self.store.live_bytes)
        return self.policy.due(self.journal.stats.bytes, estimate)

    async def maybe_compact(self) -> CompactionReport | None:
        if self.running or not self.journal.writable or not self.due():
            return None
        return await self.compact()

    async def compact(self) -> CompactionReport:
        """Snapshot the state at the next quiet point and retire what it replaces."""
        if self.running:
            raise RuntimeError("a compaction is already running")
        self.running = True
        started = time.monotonic()
        bytes_before = self.journal.stats.bytes
        try:
            loop = asyncio.get_running_loop()
            cut: asyncio.Future[tuple[SnapshotHeader, list[str], dict[str, Entry]]] = (
                loop.create_future()
            )

            def capture(seq: int, head: str, ts: str) -> None:
                try:
                    keys, entries = self.store.snapshot_view()
                except Exception as exc:  # noqa: BLE001 - handed to the awaiting compaction
                    cut.set_exception(exc)
                else:
                    cut.set_result((SnapshotHeader(seq, ts, head, len(keys)), keys, entries))

            self.journal.request_cut(capture)
            header, keys, entries = await cut
            await self.journal.wait_rolled()
            if header.seq == 0 or header.seq == self.journal.snapshot_seq:
                return self._report(header, 0, bytes_before, started)  # nothing new to compact
            items = ((key, entries[key]) for key in keys)
            await self.journal.write_snapshot(header, items)
            retired, _ = await self.journal.retire(header.seq)
            faults.crash_point("compaction-done")
            self.journal.stats.bytes += _size(self.journal.directory, header.seq)
            report = self._report(header, retired, bytes_before, started)
            self.journal.stats.compactions += 1
            self.journal.stats.compaction_seconds = report.seconds
            log.info(
                "compacted: snapshot of %d keys at seq %d, %d segments retired, %d -> %d bytes, %.2fs",
                report.keys, report.seq, report.segments_retired, report.bytes_before,
                report.bytes_after, report.seconds,
            )
            return report
        finally:
            self.running = False

    def _report(
        self, header: SnapshotHeader, retired: int, bytes_before: int, started: float
    ) -> CompactionReport:
        return CompactionReport(
            header.seq, header.keys, retired, bytes_before, self.journal.stats.bytes,
            time.monotonic() - started,
        )


def compact_stopped(journal: FileJournal, store) -> CompactionReport:  # noqa: ANN001
    """``kvd journal compact``: the same steps with no server running (the caller holds the lock)."""
    started = time.monotonic()
    bytes_before = journal.stats.bytes
    seq, head, ts = journal.last_seq, journal.head_hash, journal.last_ts
    keys, entries = store.snapshot_view()
    header = SnapshotHeader(seq, ts, head, len(keys))
    if seq == 0 or seq == journal.snapshot_seq:
        return CompactionReport(seq, len(keys), 0, bytes_before, bytes_before, 0.0)
    journal.roll_now(seq + 1)
    write_snapshot(journal.directory, header, ((key, entries[key]) for key in keys))
    retired, removed = journal.retire_now(seq)
    bytes_after = bytes_before - removed + _size(journal.directory, seq)
    return CompactionReport(
        seq, len(keys), retired, bytes_before, bytes_after, time.monotonic() - started
    )


def _size(directory: Path, seq: int) -> int:
    try:
        return (directory / snapshot_name(seq)).stat().st_size
    except FileNotFoundError:
        return 0
