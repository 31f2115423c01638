"""``kvd journal replay``: the store's state at a seq or a moment, rebuilt from the history."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import orjson

from kvd.audit.base import EXIT_OK, AuditError, note, record_ts
from kvd.audit.progress import Progress, segment_bytes
from kvd.config import Config
from kvd.log.format import parse_ts
from kvd.log.history import History, HistoryGone, apply_record, live_at
from kvd.log.snapshot import SnapshotHeader, read_header, read_snapshot
from kvd.model import Entry


def state_at(
    history: History, *, seq: int | None = None, moment: float | None = None
) -> tuple[int, str | None, dict[str, Entry]]:
    """The entries after record ``seq``, or after the last record written at or before ``moment``.

    Starts from the newest snapshot before that point, so it reads as little
    as possible. Returns (seq, that record's ts, entries, expired ones included).
    """
    stamp = record_ts(moment) if moment is not None else None
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
    progress = Progress("replay", segment_bytes(layout))
    for record in progress.records(history.records(at_seq)):
        if (seq is not None and record.seq > seq) or (stamp is not None and record.ts > stamp):
            break
        apply_record(entries, record)
        at_seq, at_ts = record.seq, record.ts
    if seq is not None and at_seq < seq:
        raise AuditError(f"seq {seq} is after the last record (seq {at_seq})")
    return at_seq, at_ts, entries


def run(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """Print the live keys at that point as one JSON object; the point itself goes to stderr."""
    at_seq, at_ts, entries = state_at(History(directory), seq=args.seq, moment=args.at)
    # Whether a key had expired depends on the moment asked about: T, or record N's time.
    moment = args.at if args.at is not None else (parse_ts(at_ts) if at_ts else 0.0)
    live = live_at(entries, moment)
    out = sys.stdout.buffer
    out.write(_json_object((key, live[key].value) for key in sorted(live)) + b"\n")
    out.flush()
    note(f"state after seq {at_seq}" + (f" ({at_ts})" if at_ts else "") + f": {len(live)} keys")
    return EXIT_OK


def _json_object(items: Iterable[tuple[str, bytes]]) -> bytes:
    """``{"key": value, ...}`` with each value's stored bytes as they are."""
    return b"{" + b",".join(orjson.dumps(key) + b":" + value for key, value in items) + b"}"

