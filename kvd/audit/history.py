"""``kvd journal history``: every change of one key, oldest first."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from kvd.audit.base import EXIT_OK, note
from kvd.audit.progress import Progress, segment_bytes
from kvd.config import Config
from kvd.log.format import OP_CLEAR, OP_PUT, Record, format_ts
from kvd.log.history import History
from kvd.log.snapshot import read_snapshot, snapshot_seq


def run(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """One JSON line per record that changed KEY, oldest first; nothing when it never did.

    Raises JournalCorrupt (exit 1) after the changes it could read, on damage or when
    records are missing from the start of the history.
    """
    key: str = args.key
    history = History(directory)
    first = history.first_record_seq()
    gap = history.layout().missing_start()  # records removed, not compacted: damage, after the output
    present = _present_before(history, key, first) if gap is None else None
    out = sys.stdout.buffer
    progress = Progress("history", segment_bytes(history.layout()))
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
    if gap is not None:
        raise gap.damage()
    return EXIT_OK


def _present_before(history: History, key: str, first: int) -> bool | None:
    """Whether ``key`` existed just before record ``first`` (None: unknown, history is gone)."""
    if first == 1:
        return False
    for path in history.layout().all_snapshots:
        if snapshot_seq(path) == first - 1:
            _, items = read_snapshot(path)
            entry = dict(items).get(key)
            note(f"records before seq {first} are no longer retained")
            if entry is not None:
                note(
                    f"at seq {first - 1} the key held a value written by seq {entry.revision} "
                    f"(`kvd journal replay --seq {first - 1}` shows it)"
                )
            return entry is not None
    note(f"records before seq {first} are no longer retained")
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

