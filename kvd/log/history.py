"""The retained history of a data directory, read-only: what auditors, the feed and ``?at=`` read.

A data directory holds, besides ``LOCK``:

- live segments ``<first seq>.jsonl`` (the newest one is appended to);
- the newest snapshot ``snapshot-<seq>.jsonl`` (the state start-up loads);
- with ``archive = true``, ``archive/`` with every retired segment and
  snapshot, so the history since seq 1 stays replayable;
- ``quarantine/`` with what ``kvd journal repair`` cut.

The retained history starts at the oldest state that can be rebuilt: seq 0
(the empty store) while every segment since seq 1 is still there, else the
oldest snapshot. Its records start at seq 1 or right after a retained
snapshot; anywhere else, records were removed (``Layout.missing_start``).
Nothing here takes the lock or writes, so it is safe on a
live server's directory: a segment that compaction moves away between
listing and opening is looked for again, and a torn tail (a write in
progress) ends the history instead of counting as damage.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvd.log.format import GENESIS_HASH, OP_CLEAR, OP_PUT, Record, format_ts
from kvd.log.reader import (
    JournalCorrupt,
    JournalReader,
    list_segments,
    segment_first_seq,
    segments_from,
)
from kvd.log.snapshot import (
    SnapshotHeader,
    list_snapshots,
    read_header,
    read_snapshot,
    snapshot_seq,
)
from kvd.model import Entry

ARCHIVE_DIR = "archive"
QUARANTINE_DIR = "quarantine"


class HistoryGone(Exception):
    """The point asked for is older than the retained history (HTTP 410)."""


@dataclass(frozen=True)
class MissingStart:
    """Records gone from before the oldest retained segment, with nothing retained in their place."""

    first: int  # the first seq missing (the one after the newest snapshot before them, or 1)
    last: int  # the last one missing: the segment starts right after it
    segment: Path  # the oldest retained segment

    @property
    def reason(self) -> str:
        return (
            f"records {self.first}..{self.last} are missing: the oldest retained segment starts "
            f"at seq {self.last + 1}, and no retained snapshot ends at seq {self.last}"
        )

    def damage(self) -> JournalCorrupt:
        """The gap as the reader reports damage, for commands that stop at it."""
        return JournalCorrupt(self.segment, 0, self.first, self.reason)


@dataclass
class Layout:
    """The files of one data directory, listed once."""

    directory: Path
    segments: list[Path] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)
    archived_segments: list[Path] = field(default_factory=list)
    archived_snapshots: list[Path] = field(default_factory=list)

    @classmethod
    def scan(cls, directory: Path) -> Layout:
        directory = Path(directory)
        archive = directory / ARCHIVE_DIR
        return cls(
            directory,
            list_segments(directory),
            list_snapshots(directory),
            list_segments(archive),
            list_snapshots(archive),
        )

    @property
    def all_segments(self) -> list[Path]:
        """Archived then live segments, in seq order (a name in both counts once: the live one)."""
        live_names = {path.name for path in self.segments}
        archived = [path for path in self.archived_segments if path.name not in live_names]
        return sorted(archived + self.segments, key=segment_first_seq)

    @property
    def all_snapshots(self) -> list[Path]:
        return sorted(self.archived_snapshots + self.snapshots, key=snapshot_seq)

    @property
    def base_snapshot(self) -> Path | None:
        """The snapshot start-up loads: the newest live one."""
        return self.snapshots[-1] if self.snapshots else None

    def missing_start(self) -> MissingStart | None:
        """Records removed before the oldest retained segment, or None when the history is whole.

        Compaction retires a segment only once a snapshot covers it, always
        cuts a new segment at the snapshot's seq + 1, and with the archive on
        moves every retired segment and snapshot to ``archive/``. So the
        oldest retained segment, archived or live, starts at seq 1 or right
        after a retained snapshot (archived when the archive was turned on
        after the store's first compaction). One exception, which start-up
        accepts as well: a live segment the newest live snapshot covers (its
        first seq at or before the snapshot's), left by a compaction that had
        not yet retired it (a crash, or a change-feed reader still sending
        it); start-up checks it up to the snapshot's head, and it is retired
        later. An archived segment never gets that exception: the records
        before it were archived too, so their absence means they were removed
        (docs/auditing.md names the one rare layout where that is not so).
        """
        segments = self.all_segments
        if not segments:
            return None
        oldest = segments[0]
        first = segment_first_seq(oldest)
        snapshots = [snapshot_seq(path) for path in self.all_snapshots]
        if first == 1 or first - 1 in snapshots:
            return None
        if oldest in self.segments and self.snapshots and first <= snapshot_seq(self.snapshots[-1]):
            return None
        before = max((seq for seq in snapshots if seq < first), default=0)
        return MissingStart(before + 1, first - 1, oldest)

    def total_bytes(self) -> int:
        return sum(_size(path) for path in self.segments + self.snapshots)


class History:
    """Records and past states of one data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def layout(self) -> Layout:
        return Layout.scan(self.directory)

    def oldest_point(self) -> int:
        """The oldest seq whose state can be rebuilt (0: the empty store, all of history)."""
        layout = self.layout()
        segments = layout.all_segments
        if not layout.all_snapshots or (segments and segment_first_seq(segments[0]) == 1):
            return 0
        return snapshot_seq(layout.all_snapshots[0])

    def first_record_seq(self) -> int:
        """The seq of the oldest record still on disk (last seq + 1 when there is none)."""
        segments = self.layout().all_segments
        if segments:
            return segment_first_seq(segments[0])
        snapshots = self.layout().all_snapshots
        return snapshot_seq(snapshots[-1]) + 1 if snapshots else 1

    def records(self, after: int = 0, *, strict_tail: bool = False) -> Iterator[Record]:
        """Every record with ``seq > after``, in order, each checked.

        Raises HistoryGone when records after ``after`` have been compacted
        away, ``JournalCorrupt`` on damage. A torn tail ends the iteration
        (``strict_tail`` raises instead, for verification of a stopped store).
        """
        last = after
        last_hash: str | None = None  # of record ``last`` once one was read: links a re-listing
        while True:
            layout = self.layout()
            segments = segments_from(layout.all_segments, last + 1)
            if not segments:
                if last + 1 < self.first_record_seq() and not _ends_at(layout, last):
                    raise HistoryGone(f"records after seq {last} are no longer retained")
                return
            first = segment_first_seq(segments[0])
            if first > last + 1:
                raise HistoryGone(f"records after seq {last} are no longer retained")
            anchor = last_hash if last_hash is not None else _anchor(layout, last)
            reader = JournalReader(segments=segments, start_seq=last + 1, start_hash=anchor)
            try:
                for record in reader.records():
                    last, last_hash = record.seq, record.hash
                    yield record
            except FileNotFoundError:
                continue  # compaction moved a segment between listing and reading: list again
            if reader.torn_tail is not None and strict_tail:
                torn = reader.torn_tail
                raise JournalCorrupt(torn.path, torn.offset, last + 1, "torn last record")
            return

    def state_at(self, seq: int) -> tuple[dict[str, Entry], str | None]:
        """The store's entries after record ``seq`` and that record's time.

        Expired entries are still included: whether a key had expired depends
        on the moment asked about, which the caller knows. Raises HistoryGone
        when ``seq`` is older than the retained history.
        """
        base_seq, entries, ts = self._base_for(seq)
        for record in self.records(base_seq):
            if record.seq > seq:
                break
            apply_record(entries, record)
            ts = record.ts
        return entries, ts

    def seq_at_time(self, moment: float) -> int:
        """The last seq whose record was written at or before ``moment`` (epoch seconds)."""
        stamp = format_ts(moment)
        oldest = self.oldest_point()
        best = oldest
        if oldest:
            header = read_header(self._snapshot_path(oldest))
            if header.ts > stamp:
                raise HistoryGone(f"{stamp} is before the retained history ({header.ts})")
        for record in self.records(oldest):
            if record.ts > stamp:
                break
            best = record.seq
        return best

    def _base_for(self, seq: int) -> tuple[int, dict[str, Entry], str | None]:
        """The newest snapshot at or before ``seq`` (or the empty store) to replay from."""
        if seq < self.oldest_point():
            raise HistoryGone(f"seq {seq} is older than the retained history")
        layout = self.layout()
        usable = [path for path in layout.all_snapshots if snapshot_seq(path) <= seq]
        if not usable:
            return 0, {}, None
        header, items = read_snapshot(usable[-1])
        return header.seq, dict(items), header.ts

    def _snapshot_path(self, seq: int) -> Path:
        for path in self.layout().all_snapshots:
            if snapshot_seq(path) == seq:
                return path
        raise FileNotFoundError(f"no snapshot at seq {seq}")

    def snapshot_headers(self) -> list[tuple[Path, SnapshotHeader]]:
        return [(path, read_header(path)) for path in self.layout().all_snapshots]


def apply_record(entries: dict[str, Entry], record: Record) -> None:
    """Replay one record into a plain dict (the store keeps its own indexes on top)."""
    if record.op == OP_PUT:
        for key, value in record.set.items():
            entries[key] = Entry(value, record.seq, record.expires.get(key))
    elif record.op == OP_CLEAR:
        entries.clear()
    else:
        for key in record.keys:
            entries.pop(key, None)


def live_at(entries: dict[str, Entry], moment: float) -> dict[str, Entry]:
    """The entries that had not expired at ``moment``."""
    return {key: entry for key, entry in entries.items() if not entry.expired(moment)}


def _anchor(layout: Layout, seq: int) -> str | None:
    """The hash of record ``seq`` when known without reading it (genesis or a snapshot head)."""
    if seq == 0:
        return GENESIS_HASH
    for path in layout.all_snapshots:
        if snapshot_seq(path) == seq:
            return read_header(path).head
    return None


def _ends_at(layout: Layout, seq: int) -> bool:
    """Whether the history ends exactly at ``seq`` (the newest snapshot, no records after)."""
    return bool(layout.snapshots) and snapshot_seq(layout.snapshots[-1]) == seq


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0

