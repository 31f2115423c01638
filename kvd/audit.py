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
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from kvd import jsonio
from kvd.config import Config
from kvd.log.format import GENESIS_HASH, OP_CLEAR, OP_PUT, Record, format_ts, parse_ts
from kvd.log.history import (
    ARCHIVE_DIR,
    QUARANTINE_DIR,
    History,
    HistoryGone,
    Layout,
    apply_record,
    live_at,
)
from kvd.log.lock import DataDirLock, DataDirLocked
from kvd.log.reader import JournalCorrupt, JournalReader, TornTail, segment_first_seq
from kvd.log.snapshot import (
    SnapshotCorrupt,
    SnapshotHeader,
    fsync_directory,
    is_snapshot_name,
    read_header,
    read_snapshot,
    snapshot_seq,
)
from kvd.model import Entry

EXIT_OK = 0
EXIT_FAILURE = 1

PROGRESS_DELAY_SECONDS = 1.0  # runs shorter than this show no meter at all
PROGRESS_EVERY_SECONDS = 0.25
MOVED_RETRIES = 3  # how often verify starts over when compaction moves files under it


class AuditError(Exception):
    """A command cannot do what was asked; the message says why (exit 1)."""


@dataclass(frozen=True)
class ExpectedHead:
    """A head an auditor recorded earlier (``SEQ:HASH``), to find again in the chain."""

    seq: int
    hash: str


def run(config: Config, args: argparse.Namespace) -> int:
    """Run one ``kvd journal`` action; returns the exit status."""
    directory = config.data_dir
    actions: dict[str, Callable[[Path, argparse.Namespace, Config], int]] = {
        "dump": _dump,
        "verify": _verify,
        "replay": _replay,
        "history": _history,
        "stats": _stats,
        "compact": _compact,
        "repair": _repair,
    }
    try:
        if not directory.is_dir():
            raise AuditError(f"no data directory at {directory}")
        return actions[args.journal_command](directory, args, config)
    except AuditError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except (JournalCorrupt, SnapshotCorrupt) as exc:
        _error(f"{exc}; `kvd journal verify` shows what is damaged")
        return EXIT_FAILURE
    except HistoryGone as exc:
        _error(f"{exc} (`kvd journal stats` shows the oldest retained point)")
        return EXIT_FAILURE
    except FileNotFoundError as exc:
        # A live server's compaction retired a file between listing and reading it.
        _error(f"{exc.filename} went away while reading (a compaction ran?); run the command again")
        return EXIT_FAILURE
    except BrokenPipeError:
        # Whoever read our output stopped (`kvd journal dump | head`): not worth a
        # traceback. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


def _error(message: str) -> None:
    print(f"kvd: error: {message}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    print(f"kvd: {message}", file=sys.stderr, flush=True)


# --- progress ------------------------------------------------------------------------


class Progress:
    """A one-line meter on stderr for long runs; silent unless stderr is a terminal."""

    def __init__(self, label: str, total_bytes: int) -> None:
        self.label = label
        self.total = max(total_bytes, 1)
        self.done = 0
        self.enabled = sys.stderr.isatty()
        self._started = time.monotonic()
        self._next = self._started + PROGRESS_DELAY_SECONDS
        self._shown = False

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + PROGRESS_EVERY_SECONDS
            percent = min(100.0, 100.0 * self.done / self.total)
            sys.stderr.write(
                f"\r{self.label}: {percent:3.0f}% ({self.done >> 20} of {self.total >> 20} MiB)"
            )
            sys.stderr.flush()
            self._shown = True

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")  # clear the meter's line
            sys.stderr.flush()
            self._shown = False

    def records(self, records: Iterable[Record]) -> Iterator[Record]:
        try:
            for record in records:
                self.advance(record.size)
                yield record
        finally:
            self.finish()


def _segment_bytes(layout: Layout) -> int:
    return sum(_size(path) for path in layout.all_segments)


# --- dump ----------------------------------------------------------------------------


def _dump(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """Print the matching records as stored, so hashes can be recomputed from the output."""
    history = History(directory)
    first = history.first_record_seq()
    since_seq = args.since_seq if args.since_seq is not None else 1
    since_ts = _stamp(args.since) if args.since is not None else None
    until_ts = _stamp(args.until) if args.until is not None else None
    if first > 1 and (args.since is not None or since_seq < first):
        _note(f"records before seq {first} are no longer retained (compacted without archive)")
    match = args.key.match if args.key is not None else None
    ops = set(args.op) if args.op else None
    out = sys.stdout.buffer
    progress = Progress("dump", _segment_bytes(history.layout()))
    for record in progress.records(history.records(max(since_seq, first) - 1)):
        if args.until_seq is not None and record.seq > args.until_seq:
            break
        # Times are compared as strings: every record's ts has the same fixed-width UTC form.
        if since_ts is not None and record.ts < since_ts:
            continue
        if until_ts is not None and record.ts > until_ts:
            continue
        if ops is not None and record.op not in ops:
            continue
        if match is not None and not record.touches(match):
            continue
        out.write(record.line)
    out.flush()
    return EXIT_OK


def _stamp(moment: float) -> str:
    """A time in the records' own ``ts`` form, so the two compare as strings."""
    return format_ts(moment)


# --- verify --------------------------------------------------------------------------


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


class _FilesMoved(Exception):
    """Compaction moved or deleted a file between listing and reading: start over."""


def verify_directory(directory: Path, expect: ExpectedHead | None = None) -> Verification:
    """Check every retained record, segment boundary and snapshot of ``directory``.

    Any gap in the records after the oldest retained one is damage, like an
    edited, inserted, removed or reordered line: the archive and the live
    segments together hold one unbroken chain. Snapshots are checked as far
    as the records on disk allow (digest; head against record ``seq``;
    entries against the replayed records).
    """
    for _ in range(MOVED_RETRIES):
        try:
            return _verify_once(directory, expect)
        except _FilesMoved:
            continue
    raise AuditError("files kept moving while verifying (compaction running?); try again")


def _verify_once(directory: Path, expect: ExpectedHead | None) -> Verification:
    layout = Layout.scan(directory)
    result = Verification(directory, expected=expect)
    segments = layout.all_segments
    result.segments = len(segments)
    result.archived_segments = sum(1 for path in segments if path.parent.name == ARCHIVE_DIR)
    snapshot_paths = {snapshot_seq(path): path for path in layout.all_snapshots}
    progress = Progress(
        "verify",
        _segment_bytes(layout) + sum(_size(path) for path in snapshot_paths.values()),
    )
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
        except FileNotFoundError:
            raise _FilesMoved from None
        headers[seq] = header
        result.snapshots[seq] = "digest"
        progress.advance(_size(path))
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
        except FileNotFoundError:
            raise _FilesMoved from None
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
    try:
        _, entries = read_snapshot(path)
        return dict(entries)
    except FileNotFoundError:
        raise _FilesMoved from None


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


def _verify(directory: Path, args: argparse.Namespace, config: Config) -> int:
    result = verify_directory(directory, args.expect_head)
    for line in _verification_report(result):
        print(line)
    return EXIT_OK if result.ok else EXIT_FAILURE


def _verification_report(result: Verification) -> list[str]:
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
            f"{_count(result.segments, 'segment')}{archived}"
        )
    else:
        lines.append("records:   none")
    if result.first_seq is not None and result.first_seq > 1:
        how = (
            f"not linked back: no snapshot ends at seq {result.unanchored_from - 1}"
            if result.unanchored_from is not None else "linked to the snapshot before them"
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


# --- replay --------------------------------------------------------------------------


def state_at(
    history: History, *, seq: int | None = None, moment: float | None = None
) -> tuple[int, str | None, dict[str, Entry]]:
    """The entries after record ``seq``, or after the last record written at or before ``moment``.

    Starts from the newest snapshot before that point, so it reads as little
    as possible. Returns (seq, that record's ts, entries, expired ones included).
    """
    stamp = _stamp(moment) if moment is not None else None
    layout = history.layout()
    oldest = history.oldest_point()
    if seq is not None and seq < oldest:
        raise HistoryGone(f"seq {seq} is older than the retained history (seq {oldest})")
    base: tuple[Path, SnapshotHeader] | None = None
    for path in layout.all_snapshots:
        header = read_header(path)
        if header.seq < oldest:
            continue
        if (seq is not None and header.seq <= seq) or (stamp is not None and header.ts <= stamp):
            base = (path, header)
    if base is None and oldest > 0:
        raise HistoryGone(f"{stamp} is before the retained history (seq {oldest})")
    entries: dict[str, Entry] = {}
    at_seq, at_ts = 0, None
    if base is not None:
        _, items = read_snapshot(base[0])
        entries = dict(items)
        at_seq, at_ts = base[1].seq, base[1].ts
    progress = Progress("replay", _segment_bytes(layout))
    for record in progress.records(history.records(at_seq)):
        if (seq is not None and record.seq > seq) or (stamp is not None and record.ts > stamp):
            break
        apply_record(entries, record)
        at_seq, at_ts = record.seq, record.ts
    if seq is not None and at_seq < seq:
        raise AuditError(f"seq {seq} is after the last record (seq {at_seq})")
    return at_seq, at_ts, entries


def _replay(directory: Path, args: argparse.Namespace, config: Config) -> int:
    at_seq, at_ts, entries = state_at(History(directory), seq=args.seq, moment=args.at)
    # Whether a key had expired depends on the moment asked about: T, or record N's time.
    moment = args.at if args.at is not None else (parse_ts(at_ts) if at_ts else 0.0)
    live = live_at(entries, moment)
    out = sys.stdout.buffer
    out.write(_json_object((key, live[key].value) for key in sorted(live)) + b"\n")
    out.flush()
    _note(f"state after seq {at_seq}" + (f" ({at_ts})" if at_ts else "") + f": {len(live)} keys")
    return EXIT_OK


def _json_object(items: Iterable[tuple[str, bytes]]) -> bytes:
    """``{"key": value, ...}`` with each value's stored bytes as they are."""
    return b"{" + b",".join(orjson.dumps(key) + b":" + value for key, value in items) + b"}"


# --- history -------------------------------------------------------------------------


def _history(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """One JSON line per record that changed KEY, oldest first; nothing when it never did."""
    key: str = args.key
    history = History(directory)
    first = history.first_record_seq()
    present = _present_before(history, key, first)
    out = sys.stdout.buffer
    progress = Progress("history", _segment_bytes(history.layout()))
    for record in progress.records(history.records(first - 1)):
        if record.op == OP_PUT:
            if key not in record.set:
                continue
            present = True
        elif record.op == OP_CLEAR:
            if present is False:
                continue  # the key was not there: this clear did not change it
            present = False
        else:
            if key not in record.keys:
                continue
            present = False
        out.write(orjson.dumps(_change(record, key)) + b"\n")
    out.flush()
    return EXIT_OK


def _present_before(history: History, key: str, first: int) -> bool | None:
    """Whether ``key`` existed just before record ``first`` (None: unknown, history is gone)."""
    if first == 1:
        return False
    for path in history.layout().all_snapshots:
        if snapshot_seq(path) == first - 1:
            _, items = read_snapshot(path)
            entry = dict(items).get(key)
            _note(f"records before seq {first} are no longer retained")
            if entry is not None:
                _note(
                    f"at seq {first - 1} the key held a value written by seq {entry.revision} "
                    f"(`kvd journal replay --seq {first - 1}` shows it)"
                )
            return entry is not None
    _note(f"records before seq {first} are no longer retained")
    return None


def _change(record: Record, key: str) -> dict[str, Any]:
    change: dict[str, Any] = {"seq": record.seq, "ts": record.ts, "op": record.op}
    if record.actor is not None:
        change["actor"] = record.actor
    if record.client is not None:
        change["client"] = record.client
    if record.op == OP_PUT:
        change["value"] = orjson.Fragment(record.set[key])
        if key in record.expires:
            change["expires"] = format_ts(record.expires[key])
    return change


# --- stats ---------------------------------------------------------------------------


def collect_stats(directory: Path) -> dict[str, Any]:
    """Numbers about the retained history and the state at its head (read-only)."""
    history = History(directory)
    layout = history.layout()
    ops: Counter[str] = Counter()
    records = 0
    first_seq = first_ts = last_ts = None
    head_seq, head_hash = 0, GENESIS_HASH
    newest = layout.all_snapshots[-1] if layout.all_snapshots else None
    if newest is not None:
        header = read_header(newest)
        head_seq, head_hash, last_ts = header.seq, header.head, header.ts
    damage = None
    progress = Progress("stats", _segment_bytes(layout))
    try:
        for record in progress.records(history.records(history.first_record_seq() - 1)):
            records += 1
            ops[record.op] += 1
            if first_seq is None:
                first_seq, first_ts = record.seq, record.ts
            head_seq, head_hash, last_ts = record.seq, record.hash, record.ts
    except (JournalCorrupt, SnapshotCorrupt) as exc:
        damage = str(exc)
    live_keys = expired_keys = live_bytes = None
    if damage is None:
        _, _, entries = state_at(history, seq=head_seq)
        live = live_at(entries, time.time())
        live_keys, expired_keys = len(live), len(entries) - len(live)
        live_bytes = sum(len(key.encode()) + len(entry.value) for key, entry in live.items())
    oldest = history.oldest_point()
    oldest_ts = None
    if oldest:
        oldest_ts = next(
            read_header(path).ts for path in layout.all_snapshots if snapshot_seq(path) == oldest
        )
    quarantine = directory / QUARANTINE_DIR
    quarantined = sorted(quarantine.iterdir()) if quarantine.is_dir() else []
    return {
        "data_dir": str(directory),
        "records": records,
        "first": {"seq": first_seq, "ts": first_ts},
        "head": {"seq": head_seq, "hash": head_hash, "ts": last_ts},
        "ops": {op: ops[op] for op in sorted(ops)},
        "live_keys": live_keys,
        "expired_keys": expired_keys,
        "live_bytes": live_bytes,
        "segments": _files(layout.segments),
        "snapshots": {**_files(layout.snapshots), "seqs": [snapshot_seq(p) for p in layout.snapshots]},
        "archive": {
            "segments": _files(layout.archived_segments),
            "snapshots": _files(layout.archived_snapshots),
        },
        "quarantine": _files(quarantined),
        "bytes": sum(_size(path) for path in layout.all_segments + layout.all_snapshots),
        "oldest_point": {"seq": oldest, "ts": oldest_ts},
        "damage": damage,
    }


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _files(paths: list[Path]) -> dict[str, int]:
    return {"count": len(paths), "bytes": sum(_size(path) for path in paths)}


def _stats(directory: Path, args: argparse.Namespace, config: Config) -> int:
    stats = collect_stats(directory)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(stats) + b"\n")
        sys.stdout.buffer.flush()
    else:
        for label, text in _stats_lines(stats):
            print(f"{label:<14} {text}")
    if stats["damage"] is not None:
        _error(f"{stats['damage']}; `kvd journal verify` shows what is damaged")
        return EXIT_FAILURE
    return EXIT_OK


def _stats_lines(stats: dict[str, Any]) -> list[tuple[str, str]]:
    first, head = stats["first"], stats["head"]
    if stats["records"]:
        records = f"{stats['records']} (seq {first['seq']}..{head['seq']}, {first['ts']} .. {head['ts']})"
    else:
        records = "0"
    ops = ", ".join(f"{op} {count}" for op, count in stats["ops"].items()) or "none"
    if stats["live_keys"] is None:
        keys = "unknown (the journal is damaged)"
    else:
        keys = f"{stats['live_keys']} ({stats['live_bytes']} bytes of keys and values)"
        if stats["expired_keys"]:
            keys += f", and {stats['expired_keys']} expired, not yet swept"
    segments, snapshots, archive = stats["segments"], stats["snapshots"], stats["archive"]
    newest = f" (newest at seq {snapshots['seqs'][-1]})" if snapshots["seqs"] else ""
    oldest = stats["oldest_point"]
    oldest_text = (
        f"seq {oldest['seq']}, {oldest['ts']} (the state there, and every record after it)"
        if oldest["seq"] else "seq 0 (the empty store: every record since seq 1 is retained)"
    )
    quarantine = stats["quarantine"]
    return [
        ("data directory", stats["data_dir"]),
        ("records", records),
        ("operations", ops),
        ("live keys", keys),
        ("segments", f"{segments['count']} live, {segments['bytes']} bytes"),
        ("snapshots", f"{snapshots['count']} live{newest}, {snapshots['bytes']} bytes"),
        ("archive", f"{_count(archive['segments']['count'], 'segment')}, "
                    f"{_count(archive['snapshots']['count'], 'snapshot')}, "
                    f"{archive['segments']['bytes'] + archive['snapshots']['bytes']} bytes"),
        ("quarantine", f"{_count(quarantine['count'], 'file')}, {quarantine['bytes']} bytes"),
        ("total bytes", f"{stats['bytes']} (segments and snapshots, archive included)"),
        ("oldest point", oldest_text),
        ("head", f"seq {head['seq']}, hash {head['hash']}"),
    ]


# --- compact (stopped store) ---------------------------------------------------------


def _locked(directory: Path, hint: str) -> DataDirLock:
    """The data directory's lock, or AuditError: this must not run beside a server."""
    lock = DataDirLock(directory)
    try:
        lock.acquire()
    except DataDirLocked as exc:
        raise AuditError(f"{exc}; stop the server first ({hint})") from None
    return lock


def _compact(directory: Path, args: argparse.Namespace, config: Config) -> int:
    from kvd.log.compaction import compact_stopped
    from kvd.log.file import FileJournal
    from kvd.store import Store

    lock = _locked(directory, "a running server compacts by itself, or on POST /journal/compact")
    try:
        store = Store()
        journal = FileJournal(
            directory,
            fsync=config.journal.fsync,
            segment_bytes=config.journal.segment_bytes,
            archive=config.journal.archive,
            on_commit=store.apply,
            on_restore=store.restore,
        )
        try:
            journal.replay()
            store.finish_replay()
            report = compact_stopped(journal, store)
        finally:
            journal.close_sync()
    finally:
        lock.release()
    if report.segments_retired == 0 and report.bytes_before == report.bytes_after:
        print(f"nothing to compact: the newest snapshot already holds the state at seq {report.seq}")
        return EXIT_OK
    where = f"moved to {directory / ARCHIVE_DIR}" if config.journal.archive else "deleted"
    print(
        f"compacted: snapshot of {report.keys} keys at seq {report.seq}; "
        f"{_count(report.segments_retired, 'segment')} {where}; "
        f"{report.bytes_before} -> {report.bytes_after} bytes in {report.seconds:.2f}s"
    )
    return EXIT_OK


# --- repair --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Bytes to move into quarantine: ``source`` from ``offset`` to its end (0: the whole file)."""

    source: Path
    offset: int
    length: int
    seqs: tuple[int, int] | None  # the records the bytes seem to hold, when they can be read
    reason: str


@dataclass
class RepairPlan:
    """What ``repair`` will do, worked out before anything changes."""

    restore: list[Path] = field(default_factory=list)  # archived files to move back to live
    cuts: list[Cut] = field(default_factory=list)
    refusal: str | None = None
    base_seq: int = 0  # the state start-up will load after the repair

    @property
    def empty(self) -> bool:
        return not self.restore and not self.cuts


@dataclass(frozen=True)
class _Base:
    seq: int
    head: str
    snapshot: Path | None


def plan_repair(directory: Path) -> RepairPlan:
    """Find what stops the store from opening, and what to move so that it opens.

    Start-up reads the newest live snapshot and the live segments after it.
    A damaged (or missing) base is replaced by an older one when the archive
    can rebuild it; otherwise the repair is refused and nothing changes.
    Then the first damaged record and everything after it is cut. Damaged
    snapshots are quarantined. Damaged archived segments are left alone:
    start-up does not read them, and cutting them would destroy evidence.
    """
    layout = Layout.scan(directory)
    plan = RepairPlan()
    damaged: dict[Path, str] = {}
    intact: dict[Path, SnapshotHeader] = {}
    for path in layout.all_snapshots:
        try:
            header, entries = read_snapshot(path)
            for _ in entries:
                pass
            intact[path] = header
        except SnapshotCorrupt as exc:
            damaged[path] = exc.reason
    for path, reason in damaged.items():
        plan.cuts.append(Cut(path, 0, _size(path), None, f"snapshot damaged: {reason}"))

    base = layout.base_snapshot
    live = layout.segments
    live_first = segment_first_seq(live[0]) if live else None
    if base is not None and base in intact:
        chosen = _Base(intact[base].seq, intact[base].head, base)
    elif base is None and (live_first is None or live_first == 1):
        chosen = _Base(0, GENESIS_HASH, None)
    else:
        # The base is damaged, or missing while the live records start later than seq 1.
        need = snapshot_seq(base) if base is not None else live_first - 1  # type: ignore[operator]
        fallback = _fallback(layout, intact, need)
        if fallback is None:
            what = (
                f"the newest snapshot {base} is damaged ({damaged[base]})" if base is not None
                else f"the live records start at seq {live_first} but no snapshot ends at seq {need}"
            )
            plan.refusal = (
                f"{what}, and no older base (an intact older snapshot with the records after "
                f"it, or the archive from seq 1) can rebuild the state at seq {need}: repairing "
                "would lose everything after it. Nothing was changed; restore it from a backup."
            )
            return plan
        chosen, plan.restore = fallback
    plan.base_seq = chosen.seq

    # The segments start-up will read once the restored files are back.
    restored_segments = [path for path in plan.restore if not is_snapshot_name(path.name)]
    after_restore = sorted(live + restored_segments, key=segment_first_seq)
    segments = _segments_from(after_restore, chosen.seq + 1)
    reader = JournalReader(segments=segments, start_seq=chosen.seq + 1, start_hash=chosen.head)
    try:
        for _ in reader.records():
            pass
    except JournalCorrupt as exc:
        if exc.seq <= chosen.seq:
            plan.refusal = (
                f"{exc}; the damage is before the snapshot at seq {chosen.seq}, in a segment that "
                "also holds later records, so cutting it would lose those too. Nothing was "
                "changed; restore the segment from a backup."
            )
            return plan
        index = segments.index(exc.path)
        plan.cuts.append(_cut(exc.path, exc.offset, exc.seq, f"damaged: {exc.reason}"))
        for later in segments[index + 1 :]:
            plan.cuts.append(_cut(later, 0, None, f"follows the damage at seq {exc.seq}"))
        return plan
    torn = reader.torn_tail
    if torn is not None:
        plan.cuts.append(_cut(torn.path, torn.offset, None, "torn last record (never acknowledged)"))
    return plan


def _fallback(
    layout: Layout, intact: dict[Path, SnapshotHeader], need: int
) -> tuple[_Base, list[Path]] | None:
    """An older base whose records reach seq ``need`` unbroken, and the archived files it needs."""
    segments = layout.all_segments
    candidates = [
        _Base(header.seq, header.head, path)
        for path, header in sorted(intact.items(), key=lambda item: -item[1].seq)
        if header.seq < need
    ]
    if segments and segment_first_seq(segments[0]) == 1:
        candidates.append(_Base(0, GENESIS_HASH, None))
    for candidate in candidates:
        needed = _segments_from(segments, candidate.seq + 1)
        reader = JournalReader(segments=needed, start_seq=candidate.seq + 1, start_hash=candidate.head)
        try:
            for _ in reader.records():
                pass
            reached = reader.last_seq
        except JournalCorrupt as exc:
            reached = exc.seq - 1
        if reached < need:
            continue
        restore = [path for path in needed if path.parent.name == ARCHIVE_DIR]
        if candidate.snapshot is not None and candidate.snapshot.parent.name == ARCHIVE_DIR:
            restore.append(candidate.snapshot)
        return candidate, restore
    return None


def _segments_from(segments: list[Path], seq: int) -> list[Path]:
    """The segments that may hold records at or after ``seq``."""
    return [
        path for index, path in enumerate(segments)
        if index + 1 == len(segments) or segment_first_seq(segments[index + 1]) > seq
    ]


def _cut(path: Path, offset: int, first_seq: int | None, reason: str) -> Cut:
    length = _size(path) - offset
    seqs = _seqs_in(path, offset)
    if first_seq is not None and seqs is not None:
        seqs = (first_seq, max(first_seq, seqs[1]))
    elif first_seq is not None:
        seqs = (first_seq, first_seq)
    return Cut(path, offset, length, seqs, reason)


def _seqs_in(path: Path, offset: int) -> tuple[int, int] | None:
    """The lowest and highest ``seq`` of the lines from ``offset`` that still parse (best effort)."""
    seqs = []
    with open(path, "rb") as file:
        file.seek(offset)
        for line in file:
            try:
                seq = orjson.loads(line).get("seq")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(seq, int):
                seqs.append(seq)
    return (min(seqs), max(seqs)) if seqs else None


def apply_repair(directory: Path, plan: RepairPlan) -> list[tuple[Cut, Path]]:
    """Carry out ``plan``: restore, then quarantine; every step fsynced, nothing deleted.

    Order matters for a crash half-way: the older base is put back before the
    damaged one leaves, so the directory never lacks a base, and running
    ``repair`` again finishes the job. Returns each cut with where it went.
    """
    archive = directory / ARCHIVE_DIR
    for path in plan.restore:
        os.replace(path, directory / path.name)
        fsync_directory(archive)
        fsync_directory(directory)
    quarantine = directory / QUARANTINE_DIR
    if plan.cuts and not quarantine.is_dir():
        quarantine.mkdir()
        fsync_directory(directory)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved: list[tuple[Cut, Path]] = []
    for cut in plan.cuts:
        source = _where_now(directory, cut.source, plan.restore)
        origin = f"{ARCHIVE_DIR}-{source.name}" if source.parent.name == ARCHIVE_DIR else source.name
        name = f"{stamp}-{origin}" + (f"-from-byte-{cut.offset}" if cut.offset else "")
        target = _unused(quarantine / name)
        if cut.offset == 0:
            # A whole file moves: one rename. A segment emptied by truncation would
            # keep a name that no longer matches its first record.
            os.replace(source, target)
            fsync_directory(quarantine)
            fsync_directory(source.parent)
        else:
            _copy_tail(source, cut.offset, target)
            fsync_directory(quarantine)
            with open(source, "r+b") as file:
                file.truncate(cut.offset)
                file.flush()
                os.fsync(file.fileno())
        moved.append((cut, target))
    if moved:
        _write_manifest(_unused(quarantine / f"{stamp}-repair.json"), directory, moved, plan)
    return moved


def _where_now(directory: Path, path: Path, restored: list[Path]) -> Path:
    return directory / path.name if path in restored else path


def _unused(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``... when a repair in the same second took it."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _copy_tail(source: Path, offset: int, target: Path) -> None:
    """Copy ``source`` from ``offset`` to a new file, atomically (temp, fsync, rename)."""
    temp = target.with_name(target.name + ".tmp")
    with open(source, "rb") as reader, open(temp, "wb") as writer:
        reader.seek(offset)
        while chunk := reader.read(1 << 20):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(temp, target)


def _write_manifest(
    path: Path, directory: Path, moved: list[tuple[Cut, Path]], plan: RepairPlan
) -> None:
    """A note beside the cut bytes saying where each came from and why."""
    manifest = {
        "repaired_at": format_ts(time.time()),
        "base_seq": plan.base_seq,
        "restored_from_archive": [path.name for path in plan.restore],
        "cuts": [
            {
                "source": str(cut.source.relative_to(directory)),
                "offset": cut.offset,
                "bytes": cut.length,
                "seqs": list(cut.seqs) if cut.seqs else None,
                "reason": cut.reason,
                "quarantined_as": target.name,
            }
            for cut, target in moved
        ],
    }
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as file:
        file.write(json.dumps(manifest, indent=2).encode() + b"\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    fsync_directory(path.parent)


def _repair(directory: Path, args: argparse.Namespace, config: Config) -> int:
    lock = _locked(directory, "`kvd journal verify` works beside it, read-only")
    try:
        plan = plan_repair(directory)
        if plan.refusal is not None:
            _error(plan.refusal)
            return EXIT_FAILURE
        if plan.empty:
            print("nothing to repair: the snapshot and the records start-up reads are intact")
        if args.dry_run:
            for path in plan.restore:
                print(f"would restore {path} to {directory} (for the older base start-up will load)")
            for cut in plan.cuts:
                print(f"would cut {_describe_cut(cut)}: {cut.reason}")
            return EXIT_OK
        moved = apply_repair(directory, plan)
        for path in plan.restore:
            print(f"restored {path} to {directory} (for the older base start-up will load)")
        for cut, target in moved:
            print(f"cut {_describe_cut(cut)} -> {target}: {cut.reason}")
    finally:
        lock.release()
    result = verify_directory(directory)
    if result.ok:
        print(f"after repair: {directory} verifies; head seq {result.head_seq}, "
              f"hash {result.head_hash}")
        return EXIT_OK
    print("after repair the store opens, but verify still finds damage that repair does not cut:")
    for line in _verification_report(result):
        print(f"  {line}")
    print("  (repair cuts only what start-up reads, the newest snapshot and the records after "
          "it; older and archived history is left as evidence: restore the file from a backup, "
          "or move it out of the data directory)")
    return EXIT_FAILURE


def _describe_cut(cut: Cut) -> str:
    seqs = f"seq {cut.seqs[0]}..{cut.seqs[1]}, " if cut.seqs else ""
    where = f"{cut.source} from byte {cut.offset}" if cut.offset else str(cut.source)
    return f"{where} ({seqs}{cut.length} bytes)"


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
