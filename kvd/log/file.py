"""The embedded journal: segment files in one data directory.

Limits and guarantees:
- Memory: only queued, not yet durable lines are held (one batch in flight,
  the next one filling).
- ``fsync="always"``: ``append`` resolves after write + fdatasync. Records
  queued while a batch is being written share the next write and fsync
  (group commit). A power loss loses nothing acknowledged.
- ``fsync="everysec"``: resolves after write(); a background fdatasync runs
  every second, so a power loss can lose about a second of acknowledged writes.
- ``fsync="no"``: resolves after write(); the OS flushes when it likes.
- Under every policy a killed process loses nothing acknowledged, since the
  bytes are in the kernel before the answer.
- A failed write is cut back off the file and fails every queued append
  (they were chained to it); later appends may succeed. A failed fsync makes
  the journal refuse writes until restart: the kernel may have dropped the
  dirty pages, so retrying could report success for data that is gone.
- With ``seal_segments``, finished segments and snapshots get seals from a
  separate process (``seal.py``): start-up reads a file from its seal only
  when the seal still matches it, so a seal changes how fast, never what.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvd.log import faults
from kvd.log.format import (
    GENESIS_HASH,
    Record,
    decode_record,
    encode_record,
    format_ts,
    segment_name,
)
from kvd.log.history import ARCHIVE_DIR, History, Layout
from kvd.log.journal import Journal, JournalStats, JournalUnavailable
from kvd.log.reader import CHAIN_BROKEN, JournalCorrupt, JournalReader, segment_first_seq
from kvd.log.seal import PutRun, Sealer, read_snapshot_seal, remove_orphan_seals, seal_path
from kvd.log.snapshot import (
    TEMP_SUFFIX,
    EntryBatch,
    SnapshotHeader,
    fsync_directory,
    read_snapshot_batches,
    snapshot_name,
    snapshot_seq,
    write_snapshot,
)
from kvd.model import Change

log = logging.getLogger("kvd.journal")

PROGRESS_EVERY_BYTES = 64 * 1024 * 1024
MAX_IN_FLIGHT = 2  # batches handed to the journal thread at once


Waiter = Callable[[Record | JournalUnavailable], None]


@dataclass(slots=True)
class _Pending:
    line: bytes
    record: Record
    future: asyncio.Future[Record] | None  # None: nobody waits (a record another node wrote)
    then: Waiter | None = None  # called in place instead of a future (``append_then``)

    def resolve(self) -> None:
        """The record is applied: tell whoever waits."""
        if self.then is not None:
            _call(self.then, self.record)
        elif self.future is not None and not self.future.done():
            self.future.set_result(self.record)

    def fail(self, error: JournalUnavailable) -> None:
        if self.then is not None:
            _call(self.then, error)
        elif self.future is not None and not self.future.done():
            self.future.set_exception(error)


def _call(then: Waiter, result: Record | JournalUnavailable) -> None:
    """One waiter's failure must not keep the rest of its batch from their answers."""
    try:
        then(result)
    except Exception:
        log.exception("answering a write failed")


def build_record(change: Change, seq: int, prev: str, ts: str) -> Record:
    """The record a change becomes at ``seq``, chained to ``prev``."""
    line, digest = encode_record(
        seq=seq,
        ts=ts,
        op=change.op,
        prev=prev,
        set_values=change.set if change.op == "put" else None,
        expires=change.expires,
        keys=change.keys if change.op in ("delete", "expire") else None,
        actor=change.actor,
        client=change.client,
    )
    return Record(
        seq=seq, ts=ts, op=change.op, set=change.set, expires=change.expires,
        keys=change.keys, actor=change.actor, prev=prev, hash=digest,
        client=change.client, line=line,
    )


class FileJournal(Journal):
    """Append-only segment files ``<first seq>.jsonl`` in ``directory``."""

    answers_in_place = True

    def __init__(
        self,
        directory: Path,
        *,
        fsync: str = "always",
        segment_bytes: int = 16 * 1024 * 1024,
        archive: bool = False,
        seal_segments: bool = False,
        on_commit: Callable[[Record], None],
        on_restore: Callable[[EntryBatch], None] = lambda batch: None,
        on_replay_puts: Callable[[PutRun], None] | None = None,
        on_abort: Callable[[], None] = lambda: None,
        on_synced: Callable[[float, int, int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(on_commit, on_abort)
        self.on_restore = on_restore
        self.on_replay_puts = on_replay_puts  # None: replay passes every record to on_commit
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.archive = archive
        self.on_synced = on_synced
        self.clock = clock
        self.stats = JournalStats()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvd-journal")
        self._fd: int | None = None
        self._active_path: Path | None = None
        self._active_size = 0
        self._durable_seq = 0
        self._durable_hash = GENESIS_HASH
        self._durable_ts = ""
        self._snapshot_seq = 0  # the newest snapshot's seq (0: none)
        self._cut_callbacks: list[Callable[[int, str, str], None]] = []
        self._next_seq = 1
        self._head_hash = GENESIS_HASH
        self._queue: list[_Pending] = []
        # Batches handed to the journal thread, oldest first. A second one is
        # handed over while the first is being made durable, so the thread
        # writes it as soon as the first is done, without waiting for the loop
        # to see that (a whole loop pass under load).
        self._in_flight: deque[list[_Pending]] = deque()
        self._start_scheduled = False
        self._chain_broken = False  # journal thread only: a write failed, skip the ones after it
        self._flushing = False  # from the first queued record until nothing is queued or in flight
        self._flush_done: asyncio.Event | None = None
        self._refusal: str | None = None  # why writes are refused until restart
        self._unsynced = False
        self._sync_task: asyncio.Task[None] | None = None
        self._closed = False
        self._sealer = Sealer() if seal_segments else None  # seals finished segments (seal.py)
        self._unsealed: list[Path] = []  # finished files start-up read without a seal

    # --- start-up ----------------------------------------------------------

    def replay(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Load the newest snapshot, then the records after it; finish any interrupted compaction."""
        started = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        _remove_temp_files(self.directory)
        remove_orphan_seals(self.directory)
        if not self.archive and (self.directory / ARCHIVE_DIR).is_dir():
            log.warning(
                "%s exists: retired segments keep going there although journal.archive is off, "
                "since deleting them would leave a gap in the archived history; move the "
                "directory away to stop archiving", self.directory / ARCHIVE_DIR,
            )
            self.archive = True
        layout = Layout.scan(self.directory)
        start_seq, start_hash = 1, GENESIS_HASH
        base = layout.base_snapshot
        base_sealed = False
        if base is not None:
            from_seal = read_snapshot_seal(base)
            base_sealed = from_seal is not None
            header, batches = from_seal or read_snapshot_batches(base)
            for batch in batches:
                self.on_restore(batch)
            start_seq, start_hash = header.seq + 1, header.head
            self._snapshot_seq = header.seq
            self._durable_ts = header.ts
        # Every live segment, also those the snapshot wholly covers (a compaction
        # stopped before retiring them, or kept them for a reader): the reader
        # checks their records up to the snapshot's head without replaying them,
        # so damage in them stops start-up instead of being retired unseen.
        segments = layout.segments
        reader = JournalReader(segments=segments, start_seq=start_seq, start_hash=start_hash)
        total = sum(path.stat().st_size for path in segments)
        next_report = PROGRESS_EVERY_BYTES
        on_puts = self.on_replay_puts
        try:
            for item in reader.items(simple_puts=on_puts is not None):
                if isinstance(item, Record):
                    self.on_commit(item)
                    self.stats.records += 1
                else:
                    on_puts(item)  # type: ignore[misc]  # not None when simple puts are asked for
                    self.stats.records += len(item)
                if progress is not None and reader.bytes_read >= next_report:
                    progress(reader.bytes_read, total)
                    next_report += PROGRESS_EVERY_BYTES
        except JournalCorrupt as exc:
            if base is None or exc.seq != start_seq or exc.reason != CHAIN_BROKEN:
                raise
            raise JournalCorrupt(exc.path, exc.offset, exc.seq, (
                f"{CHAIN_BROKEN}: its prev is not the head of {base.name}; the snapshot's header "
                "or the records from here were changed (`kvd journal repair` tells which when "
                "the archive can)"
            )) from None
        if reader.helper_chunks:
            log.info(
                "replay: a helper process checked %d chunks of the journal's later part "
                "(its peak RSS %d MiB)", reader.helper_chunks,
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
            )
        if base_sealed:
            log.info("replay: %s loaded from its seal", base.name)  # type: ignore[union-attr]
        if reader.sealed:
            log.info("replay: %d finished segments read from their seals", len(reader.sealed))
        if reader.torn_tail is not None:
            torn = reader.torn_tail
            log.warning(
                "cutting torn last record: %d bytes at offset %d of %s (after seq %d)",
                torn.length, torn.offset, torn.path, reader.last_seq,
            )
            with open(torn.path, "r+b") as file:
                file.truncate(torn.offset)
                file.flush()
                os.fsync(file.fileno())
        active = segments[-1] if segments else None
        if reader.last_seq < start_seq - 1:
            self._continue_from_snapshot(reader.last_seq, base, start_hash)  # type: ignore[arg-type]
            active = None  # a new segment, from the snapshot's seq + 1
        else:
            if reader.last_line is not None:
                self._durable_ts = decode_record(reader.last_line).ts
            self._durable_seq = reader.last_seq
            self._durable_hash = self._head_hash = reader.last_hash or start_hash
        self._next_seq = self._durable_seq + 1
        self._open_active(active)
        if base is not None:
            self._retire(self._snapshot_seq)  # a compaction may have stopped before this step
        layout = Layout.scan(self.directory)
        self.stats.segments = len(layout.segments)
        self.stats.bytes = layout.total_bytes()
        self.stats.replay_seconds = time.monotonic() - started
        unsealed_base = [base] if base is not None and not base_sealed else []
        # Sealed once the store serves (``serving``): a sealer now would take CPU from the index's build.
        self._unsealed = unsealed_base + reader.unsealed  # the reader lists finished segments only
        if progress is not None:
            progress(total, total)

    def _continue_from_snapshot(self, last_seq: int, snapshot: Path, head: str) -> None:
        """The segments end before the snapshot's seq: go on from the snapshot.

        A crash can leave this under ``fsync = everysec`` or ``no``: the
        snapshot was on disk before the last records it covers were. The
        snapshot holds their effect, so no state is lost, only their lines;
        the next record is the snapshot's seq + 1, never one it covers, and
        goes to a new segment, so the segments that end early are retired
        (or archived) below and the chain has no gap inside a file.
        """
        log.warning(
            "the journal's segments end at seq %d, before %s (seq %d): records %d..%d were lost "
            "in a crash before they reached the disk; their effect is in the snapshot, which "
            "the journal continues from", last_seq, snapshot.name, self._snapshot_seq,
            last_seq + 1, self._snapshot_seq,
        )
        self._durable_seq = self._snapshot_seq
        self._durable_hash = self._head_hash = head

    def _open_active(self, path: Path | None) -> None:
        """Make ``path`` the segment writes go to; on failure the active one stays as it was."""
        if path is None:
            path = self.directory / segment_name(self._next_seq)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if not existed:
                try:
                    fsync_directory(self.directory)
                except OSError as exc:  # records in it could vanish with its name in a crash
                    self._refuse_after_failed_fsync(exc)
                    raise
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._active_path, self._active_size = fd, path, size

    # --- appending ---------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self._refusal is None and not self._closed

    @property
    def last_seq(self) -> int:
        return self._durable_seq

    @property
    def refusal(self) -> str | None:
        return self._refusal

    def append(self, change: Change) -> asyncio.Future[Record]:
        if self._closed:
            raise JournalUnavailable("journal is closed")
        if self._refusal is not None:
            raise JournalUnavailable(self._refusal)
        record = build_record(change, self._next_seq, self._head_hash, format_ts(self.clock()))
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._enqueue(record, future)
        return future

    def append_then(self, change: Change, then: Waiter) -> None:
        if self._closed:
            raise JournalUnavailable("journal is closed")
        if self._refusal is not None:
            raise JournalUnavailable(self._refusal)
        record = build_record(change, self._next_seq, self._head_hash, format_ts(self.clock()))
        self._enqueue(record, None, then)

    def _enqueue(
        self, record: Record, future: asyncio.Future[Record] | None, then: Waiter | None = None
    ) -> None:
        """Queue a built record for the next write (with everything queued this loop pass)."""
        self._next_seq = record.seq + 1
        self._head_hash = record.hash
        self._queue.append(_Pending(record.line, record, future, then))
        if not self._flushing:
            self._flushing = True
            self._flush_done = asyncio.Event()
        if not self._start_scheduled:
            # Started on the next loop pass, so every append of this pass
            # joins the same write and fsync.
            self._start_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_batch)
        if self.fsync == "everysec" and self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_every_second())

    def _start_batch(self) -> None:
        """On the loop: hand everything queued to the journal thread as one write (+ fsync).

        Callbacks rather than a coroutine: each hop through the event loop
        costs a whole loop pass under load, and a write's answer waits for
        every hop between its append and its response.

        Up to ``MAX_IN_FLIGHT`` batches are handed over; the journal thread
        takes them in order. Not while a cut waits: a cut needs a quiet point.
        """
        self._start_scheduled = False
        if self._in_flight and (self._cut_callbacks or len(self._in_flight) >= MAX_IN_FLIGHT):
            return  # _finish_batch starts it
        if self._cut_callbacks:
            self._cut_now()
        if not self._queue:
            if not self._in_flight and self._flushing:
                self._flushing = False
                assert self._flush_done is not None
                self._flush_done.set()
            return
        batch, self._queue = self._queue, []
        self._in_flight.append(batch)
        data = b"".join(item.line for item in batch)
        loop = asyncio.get_running_loop()
        work = self._io.submit(self._write_batch, data, batch[0].record.seq)
        work.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._finish_batch, batch, data, done)
        )

    def _finish_batch(self, batch: list[_Pending], data: bytes, done: Future[float | None]) -> None:
        """On the loop: the batch is durable (or failed); answer its writers, start the next."""
        if not self._in_flight or self._in_flight[0] is not batch:
            return  # failed already, with the earlier batch it was chained to
        self._in_flight.popleft()
        error = done.exception()
        if error is not None:
            self._fail_pending(batch, error)
        else:
            seconds = done.result()
            last = batch[-1].record
            self._durable_seq = last.seq
            self._durable_hash = last.hash
            self._durable_ts = last.ts
            self.stats.records += len(batch)
            self.stats.bytes += len(data)
            self.stats.batches += 1
            self.stats.batched_records += len(batch)
            try:
                for item in batch:
                    self.on_commit(item.record)
            except Exception as exc:
                # On disk but not in memory: answering on from a state that
                # disagrees with the journal would be worse than stopping
                # writes. A restart replays the records.
                log.critical("applying durable records failed; refusing writes", exc_info=True)
                self._refusal = "applying a durable record failed; writes are refused until restart"
                self._fail_pending(batch, exc)
            else:
                for item in batch:
                    item.resolve()
                self._batch_committed(batch)
                if self.on_synced is not None and seconds is not None:
                    self.on_synced(seconds, len(batch), len(data))
        self._start_batch()

    def _fail_pending(self, batch: list[_Pending], exc: BaseException) -> None:
        """Fail the batch and everything in flight or queued after it (chained to it)."""
        failed = batch + [item for later in self._in_flight for item in later] + self._queue
        self._in_flight.clear()
        self._queue = []
        self._io.submit(self._mend_chain)  # after the skipped writes of the later batches
        self._next_seq = self._durable_seq + 1
        self._head_hash = self._durable_hash
        errno_ = getattr(exc, "errno", None) or errno.EIO
        reason = self._refusal or f"journal write failed: {os.strerror(errno_)}"
        log.error("journal write of seq %d.. failed: %s", batch[0].record.seq, exc)
        self.on_abort()
        for item in failed:
            item.fail(JournalUnavailable(reason))

    @property
    def _writing(self) -> list[_Pending]:
        """Every record handed to the journal thread and not yet applied."""
        return [item for batch in self._in_flight for item in batch]

    def _batch_committed(self, batch: list[_Pending]) -> None:
        """After a batch is written and applied (a replicated journal tracks its position here)."""

    def _write_batch(self, data: bytes, first_seq: int) -> float | None:
        """Runs on the journal thread: write, and fsync under ``always``."""
        assert self._fd is not None
        if self._chain_broken:
            raise JournalUnavailable("an earlier write failed; this one was chained to it")
        try:
            return self._write_and_sync(data, first_seq)
        except BaseException:
            self._chain_broken = True
            raise

    def _mend_chain(self) -> None:
        """Runs on the journal thread, after every write chained to a failed one was skipped."""
        self._chain_broken = False

    def _write_and_sync(self, data: bytes, first_seq: int) -> float | None:
        if self._active_size >= self.segment_bytes:
            self._roll_segment(first_seq)
        start_size = self._active_size
        try:
            view = memoryview(data)
            written = 0
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError:
            self._cut_back(start_size)
            raise
        self._active_size += len(data)
        if self.fsync != "always":
            self._unsynced = True
            self._check_still_linked()
            return None
        started = time.monotonic()
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._refuse_after_failed_fsync(exc)
            self._cut_back(start_size)
            raise
        seconds = time.monotonic() - started
        self._check_still_linked()
        return seconds

    def _check_still_linked(self) -> None:
        """Refuse writes once the active segment is no longer in the data directory.

        Someone deleted it (or the whole directory) under the server: records
        written to it would be acknowledged and then lost, and the data
        directory's lock is gone with it, so a second server could start there.
        One fstat a batch.
        """
        if os.fstat(self._fd).st_nlink > 0:  # type: ignore[arg-type]
            return
        self._refusal = (
            f"the active segment {self._active_path} was deleted from the data directory; "
            "writes are refused until kvd restarts"
        )
        log.critical("%s", self._refusal)
        raise JournalUnavailable(self._refusal)

    def _cut_back(self, size: int) -> None:
        """Remove a failed batch's bytes so no trace of it survives."""
        try:
            os.ftruncate(self._fd, size)  # type: ignore[arg-type]
            self._active_size = size
        except OSError as exc:
            self._refuse_after_failed_fsync(exc)

    def _refuse_after_failed_fsync(self, exc: OSError) -> None:
        self._refusal = (
            f"journal fsync failed ({os.strerror(exc.errno or errno.EIO)}); "
            "writes are refused until kvd restarts"
        )
        log.critical("%s", self._refusal)

    def _roll_segment(self, first_seq: int, *, seal: bool = True) -> None:
        """Start the segment ``first_seq``; ``seal`` the one finished (not when a
        compaction is about to retire it)."""
        assert self._fd is not None
        target = self.directory / segment_name(first_seq)
        if target == self._active_path:
            return  # the active segment already starts there (it is empty)
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._refuse_after_failed_fsync(exc)
            raise
        finished, finished_fd, finished_size = self._active_path, self._fd, self._active_size
        # The new segment opens before the finished one closes: when it cannot be
        # created (no inodes, no space), this write fails and the next one tries again.
        self._open_active(target)
        os.close(finished_fd)
        self.stats.segments += 1
        if seal and finished is not None and finished_size:
            self._seal([finished])

    def serving(self) -> None:
        self._seal(self._unsealed)
        self._unsealed = []

    def _seal(self, segments: list[Path]) -> None:
        """Have finished segments sealed, so that start-up can skip re-checking them
        line by line (seal.py). Slower starts, never wrong ones, when that fails."""
        if self._sealer is not None:
            self._sealer.seal(segments)

    async def _sync_every_second(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed and self._refusal is None:
            await asyncio.sleep(1.0)
            if self._unsynced:
                seconds = await loop.run_in_executor(self._io, self._sync_now)
                if seconds is not None and self.on_synced is not None:
                    self.on_synced(seconds, 0, 0)

    def _sync_now(self) -> float | None:
        """Runs on the journal thread: the ``everysec`` fsync; returns its duration."""
        if self._fd is None or not self._unsynced:
            return None
        self._unsynced = False
        started = time.monotonic()
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._refuse_after_failed_fsync(exc)
            return None
        return time.monotonic() - started

    # --- compaction ----------------------------------------------------------

    @property
    def snapshot_seq(self) -> int:
        return self._snapshot_seq

    @property
    def head_hash(self) -> str:
        """The hash of the last durable record (the chain's head)."""
        return self._durable_hash

    @property
    def last_ts(self) -> str:
        return self._durable_ts

    def roll_now(self, first_seq: int) -> None:
        """Offline compaction only (no loop, no writers): start a new segment now."""
        self._roll_segment(first_seq, seal=False)

    def retire_now(self, through_seq: int) -> tuple[int, int]:
        """Offline compaction only: retire at once."""
        retired, removed = self._retire(through_seq)
        self._snapshot_seq = through_seq
        return retired, removed

    def history(self) -> History:
        return History(self.directory)

    def request_cut(self, callback: Callable[[int, str, str], None]) -> None:
        """Call ``callback(seq, hash, ts)`` on the loop at the next quiet point.

        A quiet point: every durable record is applied, none is being written,
        so the store's committed view is exactly the state after ``seq``. The
        next record then goes to a new segment, so every segment before it
        holds only records up to ``seq``.
        """
        self._cut_callbacks.append(callback)
        if not self._in_flight and not self._start_scheduled:
            self._cut_now()

    def _cut_now(self) -> None:
        callbacks, self._cut_callbacks = self._cut_callbacks, []
        seq, digest, ts = self._durable_seq, self._durable_hash, self._durable_ts
        self._roll_job = self._io.submit(self._roll_for_cut, seq + 1)
        for callback in callbacks:
            try:
                callback(seq, digest, ts)
            except Exception:  # runs inside the write path: it must never stop writes
                log.exception("a journal cut callback failed")

    def _roll_for_cut(self, first_seq: int) -> None:
        """Runs on the journal thread, ordered before any later batch."""
        if self._refusal is not None:
            raise JournalUnavailable(self._refusal)
        self._roll_segment(first_seq, seal=False)
        faults.crash_point("segment-rolled")

    async def wait_rolled(self) -> None:
        """Wait for the roll of the last ``request_cut``; raises if it failed."""
        await asyncio.wrap_future(self._roll_job)

    async def write_snapshot(self, header: SnapshotHeader, entries) -> None:  # noqa: ANN001
        """Write a snapshot off the loop (not on the journal thread: writes go on meanwhile)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, write_snapshot, self.directory, header, entries)

    async def retire(self, through_seq: int) -> tuple[int, int]:
        """Retire segments holding only records up to ``through_seq``, and older snapshots.

        Runs on the journal thread, so the active segment is never touched.
        Segments a reader pinned stay until a later compaction. Returns
        (segments retired, bytes removed from the live directory).
        """
        limit = min(through_seq, self.min_pin() - 1)
        loop = asyncio.get_running_loop()
        retired, removed = await loop.run_in_executor(self._io, self._retire, limit, through_seq)
        self._snapshot_seq = max(self._snapshot_seq, through_seq)
        self._seal([self.directory / snapshot_name(through_seq)])  # the snapshot just written
        self.stats.segments -= retired
        self.stats.bytes -= removed
        return retired, removed

    def _retire(self, segments_through: int, snapshot_seq_: int | None = None) -> tuple[int, int]:
        """Delete or archive what a snapshot made redundant; returns (segments, bytes)."""
        snapshot_seq_ = segments_through if snapshot_seq_ is None else snapshot_seq_
        layout = Layout.scan(self.directory)
        retired = removed = 0
        for path, following in zip(layout.segments, layout.segments[1:], strict=False):
            if path == self._active_path or segment_first_seq(following) - 1 > segments_through:
                break
            removed += path.stat().st_size
            seal_path(path).unlink(missing_ok=True)  # an archive keeps records, not caches of them
            self._retire_file(path)
            retired += 1
            if retired == 1:
                faults.crash_point("segment-retired")
        for path in layout.snapshots:
            if snapshot_seq(path) < snapshot_seq_:
                removed += path.stat().st_size
                seal_path(path).unlink(missing_ok=True)
                self._retire_file(path)
                faults.crash_point("snapshot-retired")
        return retired, removed

    def _retire_file(self, path: Path) -> None:
        if self.archive:
            archive = self.directory / ARCHIVE_DIR
            if not archive.is_dir():
                archive.mkdir()
                fsync_directory(self.directory)
            os.replace(path, archive / path.name)
            fsync_directory(archive)
        else:
            path.unlink()
        fsync_directory(self.directory)

    # --- shutdown ----------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flushing and self._flush_done is not None:
            await self._flush_done.wait()
        if self._sync_task is not None:
            self._sync_task.cancel()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._close_files)
        self._io.shutdown(wait=True)

    def close_sync(self) -> None:
        """Close without a loop (tools and tests that only replayed)."""
        self._closed = True
        self._close_files()
        self._io.shutdown(wait=True)

    def _close_files(self) -> None:
        if self._sealer is not None:
            self._sealer.close()
        if self._fd is None:
            return
        try:
            if self._refusal is None:
                os.fdatasync(self._fd)
        except OSError as exc:
            log.error("final journal fsync failed: %s", exc)
        os.close(self._fd)
        self._fd = None


def _remove_temp_files(directory: Path) -> None:
    """Half-written snapshots a crash left behind."""
    for name in os.listdir(directory):
        if name.endswith(TEMP_SUFFIX):
            os.unlink(directory / name)

