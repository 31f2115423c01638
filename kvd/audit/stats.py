"""``kvd journal stats``: numbers about the retained history and the state at its head."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from kvd.audit.base import EXIT_FAILURE, EXIT_OK, counted, error, file_size
from kvd.audit.progress import Progress, segment_bytes
from kvd.audit.replay import state_at
from kvd.config import Config
from kvd.log.format import GENESIS_HASH
from kvd.log.history import QUARANTINE_DIR, History, live_at
from kvd.log.reader import JournalCorrupt
from kvd.log.snapshot import SnapshotCorrupt, read_header, snapshot_seq


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
    progress = Progress("stats", segment_bytes(layout))
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
        gap = layout.missing_start()  # the state at the head is known all the same
        if gap is not None:
            damage = str(gap.damage())
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
        "bytes": sum(file_size(path) for path in layout.all_segments + layout.all_snapshots),
        "oldest_point": {"seq": oldest, "ts": oldest_ts},
        "damage": damage,
    }


def _files(paths: list[Path]) -> dict[str, int]:
    return {"count": len(paths), "bytes": sum(file_size(path) for path in paths)}


def run(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """Print the numbers (as text, or --json); exit 1 when the journal is damaged."""
    stats = collect_stats(directory)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(stats) + b"\n")
        sys.stdout.buffer.flush()
    else:
        for label, text in _stats_lines(stats):
            print(f"{label:<14} {text}")
    if stats["damage"] is not None:
        error(f"{stats['damage']}; `kvd journal verify` shows what is damaged")
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
    if not oldest["seq"] and first["seq"] not in (None, 1):  # no snapshot, and records missing
        oldest_text = f"none (records before seq {first['seq']} are missing)"
    quarantine = stats["quarantine"]
    return [
        ("data directory", stats["data_dir"]),
        ("records", records),
        ("operations", ops),
        ("live keys", keys),
        ("segments", f"{segments['count']} live, {segments['bytes']} bytes"),
        ("snapshots", f"{snapshots['count']} live{newest}, {snapshots['bytes']} bytes"),
        ("archive", f"{counted(archive['segments']['count'], 'segment')}, "
                    f"{counted(archive['snapshots']['count'], 'snapshot')}, "
                    f"{archive['segments']['bytes'] + archive['snapshots']['bytes']} bytes"),
        ("quarantine", f"{counted(quarantine['count'], 'file')}, {quarantine['bytes']} bytes"),
        ("total bytes", f"{stats['bytes']} (segments and snapshots, archive included)"),
        ("oldest point", oldest_text),
        ("head", f"seq {head['seq']}, hash {head['hash']}"),
    ]

