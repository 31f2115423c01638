"""Compaction: write a snapshot of the live state, then retire the segments it replaces.

Online, the steps are split between the event loop and threads so that
requests keep being served and writes keep landing:

1. on the loop, at a quiet point of the journal (``request_cut``): fork a
   child that sees the state after seq S (copy-on-write), and make the next
   record start a new segment;
2. in the child: write the snapshot (temp file, fsync, rename, fsync
   directory), then exit; the server waits for it off the loop. Without
   ``fork`` the state is copied on the loop instead (a shallow dict copy;
   entries are replaced, never changed in place) and written by a thread;
3. on the journal thread: delete or archive the segments holding only
   records up to S, and the previous snapshot.

A crash at any step leaves a directory start-up can load: before step 2
completes there is no new snapshot and every segment is still there; after
it, start-up loads the new snapshot and finishes step 3 itself.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvd.log import faults
from kvd.log.file import FileJournal
from kvd.log.snapshot import SnapshotHeader, snapshot_name, snapshot_temp_path, write_snapshot

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


def live_estimate(keys: int, live_bytes: int) -> int:
    """What a snapshot of the live state takes, roughly: keys, values and per-line framing."""
    return live_bytes + ENTRY_OVERHEAD_BYTES * keys


class Compactor:
    """Runs one compaction at a time for a serving store."""

    def __init__(self, journal: FileJournal, store, policy: CompactionPolicy) -> None:  # noqa: ANN001
        self.journal = journal
        self.store = store
        self.policy = policy
        self.running = False
        self.fork = hasattr(os, "fork") and sys.platform == "linux"
        """Write snapshots from a forked child (else from a thread of this process)."""

    def due(self) -> bool:
        estimate = live_estimate(len(self.store), self.store.live_bytes)
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
            cut: asyncio.Future[tuple[SnapshotHeader, Any]] = loop.create_future()

            def capture(seq: int, head: str, ts: str) -> None:
                header = SnapshotHeader(seq, ts, head, len(self.store))
                try:
                    if seq == 0 or seq == self.journal.snapshot_seq:
                        writer = None  # nothing new since the last snapshot
                    elif self.fork:
                        writer = fork_snapshot_writer(self.journal.directory, header, self.store)
                    else:
                        writer = self.store.snapshot_view()
                except Exception as exc:  # noqa: BLE001 - handed to the awaiting compaction
                    cut.set_exception(exc)
                else:
                    cut.set_result((header, writer))

            self.journal.request_cut(capture)
            header, writer = await cut
            try:
                await self.journal.wait_rolled()
            finally:
                if isinstance(writer, int):
                    await wait_for_writer(writer, snapshot_temp_path(self.journal.directory, header.seq))
            if writer is None:
                return self._report(header, 0, bytes_before, started)
            if not isinstance(writer, int):
                try:
                    await self.journal.write_snapshot(header, writer)
                except OSError as exc:  # as a forked writer's failure (it has removed its temp file)
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                    raise CompactionFailed(f"snapshot write failed: {reason}") from exc
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


class CompactionFailed(Exception):
    """The snapshot writer did not finish; nothing was retired."""


def fork_snapshot_writer(directory: Path, header: SnapshotHeader, store) -> int:  # noqa: ANN001
    """Fork a child that writes the snapshot of ``store`` as it is now; returns its pid.

    Like Redis's BGSAVE: the child sees the state at the moment of the fork
    (copy-on-write pages), so nothing is copied on the loop, and the
    encoding runs on another core instead of contending with the event loop
    for the GIL. The child runs no loop, no thread and no logging; it dies
    with the server (PR_SET_PDEATHSIG) and, at a test crash point, takes
    the server with it, as one crash would.
    """
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # Inherited descriptors are the server's: the LOCK above all, which a
        # child outliving a killed server would otherwise hold a moment longer.
        os.closerange(3, _max_fd())
        gc.disable()
        _die_with(parent)
        faults.crash_with(parent)
        write_snapshot(directory, header, store.ordered_items())
        code = 0
    except BaseException:  # noqa: BLE001 - the child must always reach _exit
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


async def wait_for_writer(pid: int, temp: Path) -> None:
    """Reap the snapshot writer; raises CompactionFailed unless it exited 0.

    A writer that fails removes its temp file ``temp`` itself, but one that
    is killed cannot (the OOM killer picks the forked child, the largest
    process): the parent removes it, or every kill would leave one more
    half-written snapshot until the next start. Once the writer is reaped
    nothing writes to ``temp`` any more. No directory fsync: should the
    removal be lost in a crash, start-up removes the file.
    """
    loop = asyncio.get_running_loop()
    _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return
    failure = CompactionFailed(f"snapshot writer (pid {pid}) {_exit_reason(code)}")
    try:
        # Off the loop: unlinking a large file frees its blocks, which can take a while.
        await loop.run_in_executor(None, functools.partial(temp.unlink, missing_ok=True))
    except OSError as exc:  # the writer's failure is what the caller must hear about
        log.warning("%s; its temp file stays until the next start: %s", failure, exc)
    raise failure


def _exit_reason(code: int) -> str:
    """``os.waitstatus_to_exitcode``'s result in words: a negative code is the signal."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"killed by signal {-code}{name}"


def _die_with(parent: int) -> None:
    """Have the kernel kill this child if the server dies first (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 65536


def compact_stopped(journal: FileJournal, store) -> CompactionReport:  # noqa: ANN001
    """``kvd journal compact``: the same steps with no server running (the caller holds the lock)."""
    started = time.monotonic()
    bytes_before = journal.stats.bytes
    seq, head, ts = journal.last_seq, journal.head_hash, journal.last_ts
    header = SnapshotHeader(seq, ts, head, len(store))
    if seq == 0 or seq == journal.snapshot_seq:
        return CompactionReport(seq, header.keys, 0, bytes_before, bytes_before, 0.0)
    journal.roll_now(seq + 1)
    write_snapshot(journal.directory, header, store.ordered_items())  # nothing else runs: no copy
    retired, removed = journal.retire_now(seq)
    bytes_after = bytes_before - removed + _size(journal.directory, seq)
    return CompactionReport(
        seq, header.keys, retired, bytes_before, bytes_after, time.monotonic() - started
    )


def _size(directory: Path, seq: int) -> int:
    try:
        return (directory / snapshot_name(seq)).stat().st_size
    except FileNotFoundError:
        return 0
