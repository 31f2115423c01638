"""``kvd journal verify``: every retained record, segment boundary and snapshot, checked.

Memory: one state of the store (the replayed records), and one more
snapshot's entries while comparing the two.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvd import jsonio
from kvd.audit.base import EXIT_FAILURE, EXIT_OK, Inconclusive, counted, file_size
from kvd.audit.progress import Progress, segment_bytes
from kvd.config import Config
from kvd.log.format import GENESIS_HASH, Record, format_ts
from kvd.log.history import ARCHIVE_DIR, Layout, apply_record
from kvd.log.reader import JournalCorrupt, JournalReader, TornTail, segment_first_seq
from kvd.log.snapshot import SnapshotCorrupt, SnapshotHeader, read_snapshot, snapshot_seq
from kvd.model import Entry

MOVED_RETRIES = 8  # how often verify starts over when compaction moves files under it
MOVED_BACKOFF_S = 0.1  # times the try number: 2.8 s of waiting in all


@dataclass(frozen=True)
class ExpectedHead:
    """A head an auditor recorded earlier (``SEQ:HASH``), to find again in the chain."""

    seq: int
    hash: str


@dataclass(frozen=True)
class Finding:
    """One piece of damage: the file, the byte offset and seq when known, and why."""

    file: str
    offset: int | None
    seq: int | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.offset is None else f"{self.file} at byte {self.offset}"
        return f"{where} (seq {self.seq}): {self.reason}" if self.seq is not None else f"{where}: {self.reason}"


@dataclass
class Verification:
    """What ``verify`` found in one pass over a data directory."""

    directory: Path
    records: int = 0
    first_seq: int | None = None  # the oldest record read
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    head_ts: str | None = None
    segments: int = 0
    archived_segments: int = 0
    snapshots: dict[int, str] = field(default_factory=dict)  # seq -> how far it was checked
    unanchored_from: int | None = None  # the chain starts here with nothing to link it to
    torn_tail: TornTail | None = None
    damage: list[Finding] = field(default_factory=list)
    expected: ExpectedHead | None = None

    @property
    def ok(self) -> bool:
        return not self.damage


def verify_directory(directory: Path, expect: ExpectedHead | None = None) -> Verification:
    """Check every retained record, segment boundary and snapshot of ``directory``.

    Any gap in the records is damage, like an edited, inserted, removed or
    reordered line: the archive and the live segments together hold one
    unbroken chain, which starts at seq 1 or right after a retained snapshot
    (``Layout.missing_start`` has the one exception, a live segment awaiting
    retirement, and why it is safe). Snapshots are checked as far
    as the records on disk allow (digest; head against record ``seq``;
    entries against the replayed records).
    """
    for attempt in range(MOVED_RETRIES):
        try:
            return _verify_once(directory, expect)
        except FileNotFoundError:  # a file listed went away before it was read: compaction
            time.sleep(MOVED_BACKOFF_S * attempt)  # let a compaction in progress finish
    raise Inconclusive(
        f"files kept moving while verifying ({MOVED_RETRIES} tries; is compaction running "
        "over and over?): nothing was found damaged, but nothing was checked whole; try again"
    )


def _verify_once(directory: Path, expect: ExpectedHead | None) -> Verification:
    layout = Layout.scan(directory)
    result = Verification(directory, expected=expect)
    segments = layout.all_segments
    result.segments = len(segments)
    result.archived_segments = sum(1 for path in segments if path.parent.name == ARCHIVE_DIR)
    snapshot_paths = {snapshot_seq(path): path for path in layout.all_snapshots}
    progress = Progress(
        "verify",
        segment_bytes(layout) + sum(file_size(path) for path in snapshot_paths.values()),
    )
    gap = layout.missing_start()
    if gap is not None:  # the walk still checks every record that is there
        result.damage.append(Finding(str(gap.segment), 0, gap.first, gap.reason))
    try:
        headers = _check_snapshot_digests(snapshot_paths, result, progress)
        _walk_chain(segments, snapshot_paths, headers, result, progress)
    finally:
        progress.finish()
    return result


def _check_snapshot_digests(
    paths: dict[int, Path], result: Verification, progress: Progress
) -> dict[int, SnapshotHeader]:
    """Every snapshot's own digest; returns the headers of the intact ones."""
    headers: dict[int, SnapshotHeader] = {}
    for seq, path in paths.items():
        try:
            header, entries = read_snapshot(path)
            for _ in entries:
                pass
        except SnapshotCorrupt as exc:
            result.damage.append(Finding(str(path), None, seq, f"snapshot damaged: {exc.reason}"))
            continue
        headers[seq] = header
        result.snapshots[seq] = "digest"
        progress.advance(file_size(path))
    return headers


def _walk_chain(
    segments: list[Path],
    snapshot_paths: dict[int, Path],
    headers: dict[int, SnapshotHeader],
    result: Verification,
    progress: Progress,
) -> None:
    """Read every segment in order, checking each boundary and every snapshot met on the way."""
    state: dict[str, Entry] | None = None  # the replayed state, once a base is known
    last_seq: int | None = None
    last_hash: str | None = None
    expected_hash: str | None = None
    for index, path in enumerate(segments):
        first = segment_first_seq(path)
        if last_seq is None:
            if first == 1:
                anchor, state = GENESIS_HASH, {}
            elif first - 1 in headers:
                anchor = headers[first - 1].head
                state = _load_entries(snapshot_paths[first - 1])
                result.snapshots[first - 1] = "anchor"
            else:
                anchor, result.unanchored_from = None, first
        elif first > last_seq + 1:
            result.damage.append(Finding(
                str(path), 0, last_seq + 1,
                f"records {last_seq + 1}..{first - 1} are missing (this segment starts at seq {first})",
            ))
            return
        elif first < last_seq + 1:
            result.damage.append(Finding(
                str(path), 0, first,
                f"this segment starts at seq {first}, which the segment before already holds",
            ))
            return
        else:
            anchor = last_hash
        reader = JournalReader(segments=[path], start_seq=first, start_hash=anchor)
        try:
            for record in reader.records():
                progress.advance(record.size)
                result.records += 1
                if result.first_seq is None:
                    result.first_seq = record.seq
                result.head_ts = record.ts
                if state is not None:
                    apply_record(state, record)
                if _expected_seq(result) == record.seq:
                    expected_hash = record.hash
                if record.seq in snapshot_paths:
                    state = _check_snapshot_at(record, snapshot_paths, headers, state, result)
        except JournalCorrupt as exc:
            result.damage.append(Finding(str(exc.path), exc.offset, exc.seq, exc.reason))
            return
        last_seq, last_hash = reader.last_seq, reader.last_hash
        torn = reader.torn_tail
        if torn is not None:
            if index < len(segments) - 1:
                result.damage.append(Finding(
                    str(torn.path), torn.offset, last_seq + 1,
                    "unterminated record in a segment that is not the last",
                ))
                return
            result.torn_tail = torn
    _settle_head(result, last_seq, last_hash, headers, expected_hash)


def _expected_seq(result: Verification) -> int | None:
    return result.expected.seq if result.expected is not None else None


def _check_snapshot_at(
    record: Record,
    paths: dict[int, Path],
    headers: dict[int, SnapshotHeader],
    state: dict[str, Entry] | None,
    result: Verification,
) -> dict[str, Entry] | None:
    """Record ``seq`` of a snapshot was just read: its head, then its entries. Returns the state."""
    header = headers.get(record.seq)
    if header is None:
        return state  # its digest failed: already reported
    path = paths[record.seq]
    if header.head != record.hash:
        result.damage.append(Finding(
            str(path), None, record.seq,
            f"snapshot head {header.head} is not the hash of record {record.seq} ({record.hash})",
        ))
        return state
    entries = _load_entries(path)
    if state is None:
        result.snapshots[record.seq] = "head"
        return entries  # a trusted base from here on: its digest and head check out
    difference = _difference(state, entries)
    if difference is not None:
        result.damage.append(Finding(
            str(path), None, record.seq, f"snapshot differs from the replayed records: {difference}"
        ))
    else:
        result.snapshots[record.seq] = "replayed"
    return state


def _settle_head(
    result: Verification,
    last_seq: int | None,
    last_hash: str | None,
    headers: dict[int, SnapshotHeader],
    expected_hash: str | None,
) -> None:
    """After a clean walk: the head, snapshots beyond it, and the recorded head if any."""
    if last_seq is None and headers:  # no segment at all: the newest snapshot is the head
        last_seq = max(headers)
    if last_seq is not None:
        result.head_seq = last_seq
        header = headers.get(last_seq)
        if last_hash is None and header is not None:
            last_hash = header.head
        result.head_hash = last_hash if last_hash is not None else "unknown"
        if result.records == 0 and header is not None:
            result.head_ts = header.ts  # no record read: the snapshot's is the newest time
    for seq in sorted(headers):
        if seq > result.head_seq:
            result.damage.append(Finding(
                str(result.directory), None, seq,
                f"a snapshot at seq {seq} is ahead of the journal, which ends at seq "
                f"{result.head_seq}: records {result.head_seq + 1}..{seq} are missing",
            ))
    expected = result.expected
    if expected is None:
        return
    where = str(result.directory)
    if expected.seq > result.head_seq:
        result.damage.append(Finding(
            where, None, expected.seq,
            f"the journal ends at seq {result.head_seq}, before the recorded head: "
            "records were cut off the end",
        ))
        return
    if expected_hash is None:
        if expected.seq == 0:
            expected_hash = GENESIS_HASH
        elif expected.seq in headers:
            expected_hash = headers[expected.seq].head
        else:
            result.damage.append(Finding(
                where, None, expected.seq,
                "the recorded head is no longer retained (compacted without archive), so it "
                "cannot be checked",
            ))
            return
    if expected_hash != expected.hash:
        result.damage.append(Finding(
            where, None, expected.seq,
            f"hash {expected_hash} differs from the recorded head {expected.hash}: "
            "the history up to it was rewritten",
        ))


def _load_entries(path: Path) -> dict[str, Entry]:
    _, entries = read_snapshot(path)
    return dict(entries)


def _difference(replayed: dict[str, Entry], snapshot: dict[str, Entry]) -> str | None:
    """The first key whose entry differs, described without its value (values may be secrets)."""
    if replayed.keys() != snapshot.keys():
        extra = sorted(snapshot.keys() - replayed.keys())
        if extra:
            return f"key {extra[0]!r} is in the snapshot but not in the replayed state"
        missing = sorted(replayed.keys() - snapshot.keys())
        return f"key {missing[0]!r} is missing from the snapshot"
    for key in sorted(replayed):
        want, got = replayed[key], snapshot[key]
        if want.revision != got.revision:
            return f"key {key!r} has revision {got.revision}, the records give {want.revision}"
        if _expiry_text(want.expires_at) != _expiry_text(got.expires_at):
            return f"key {key!r} has a different expiry"
        # Byte equality is the rule; parsed equality forgives a different encoding of one value.
        if want.value != got.value and jsonio.loads(want.value, max_depth=None) != jsonio.loads(
            got.value, max_depth=None
        ):
            return f"key {key!r} has a different value"
    return None


def _expiry_text(moment: float | None) -> str | None:
    return None if moment is None else format_ts(moment)


def run(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """Print the report; exit 0 only when nothing is damaged."""
    result = verify_directory(directory, args.expect_head)
    for line in verification_report(result):
        print(line)
    return EXIT_OK if result.ok else EXIT_FAILURE


def verification_report(result: Verification) -> list[str]:
    """The lines ``verify`` prints (and ``repair`` after it): the damage, or what checked out."""
    lines: list[str] = []
    if not result.ok:
        for finding in sorted(result.damage, key=lambda f: (f.seq is None, f.seq or 0)):
            lines.append(f"DAMAGED: {finding}")
        count = len(result.damage)
        checked = (
            f"records {result.first_seq}..{result.first_seq + result.records - 1} check out"
            if result.records and result.first_seq is not None else "no record checks out"
        )
        lines.append(
            f"verify failed: {count} problem{'s' if count != 1 else ''} in {result.directory}; {checked}"
        )
        return lines
    if result.torn_tail is not None:
        torn = result.torn_tail
        lines.append(
            f"warning: torn last record: {torn.length} bytes at byte {torn.offset} of {torn.path} "
            f"(after seq {result.head_seq}); a write in progress or a crash mid-write, never "
            "acknowledged, so not damage (kvd serve cuts it at start-up)"
        )
    lines.append(f"ok: {result.directory} verified")
    if result.records and result.first_seq is not None:
        last = result.first_seq + result.records - 1
        archived = f", {result.archived_segments} archived" if result.archived_segments else ""
        lines.append(
            f"records:   {result.first_seq}..{last} ({result.records}) in "
            f"{counted(result.segments, 'segment')}{archived}"
        )
    else:
        lines.append("records:   none")
    if result.first_seq is not None and result.first_seq > 1:
        how = "linked to the snapshot before them"
        if result.unanchored_from is not None:  # only a live segment a live snapshot covers passes
            covering = [seq for seq in sorted(result.snapshots) if seq >= result.unanchored_from]
            how = (
                f"not linked back, but the snapshot at seq {covering[0]} covers them "
                "(a compaction has yet to retire their segment)"
                if covering else "not linked back"
            )
        lines.append(f"           records before seq {result.first_seq} are not retained; {how}")
    lines.append(f"snapshots: {_describe_snapshots(result.snapshots)}")
    lines.append(f"head:      seq {result.head_seq}, hash {result.head_hash}" + (
        f", {result.head_ts}" if result.head_ts else ""
    ))
    if result.expected is not None:
        lines.append(f"expected:  seq {result.expected.seq} still has the recorded hash")
    lines.append(
        f"anchor:    {result.head_seq}:{result.head_hash}  (record it elsewhere: a later "
        "`verify --expect-head` with it detects changed or missing history)"
    )
    return lines


_SNAPSHOT_CHECKS = {
    "replayed": "entries equal the replayed records",
    "head": "head matches its record",
    "anchor": "the records after it link to its head",
    "digest": "digest only (its records are not retained)",
}


def _describe_snapshots(checks: dict[int, str]) -> str:
    if not checks:
        return "none"
    return "; ".join(f"seq {seq}: {_SNAPSHOT_CHECKS[how]}" for seq, how in sorted(checks.items()))

