"""``kvd journal dump``: the retained records, byte for byte as stored."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvd.audit.base import EXIT_OK, note, record_ts
from kvd.audit.progress import Progress, segment_bytes
from kvd.config import Config
from kvd.log.history import History


def run(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """Print the matching records as stored, so hashes can be recomputed from the output.

    Raises JournalCorrupt (exit 1) after the records it could read, on damage or when
    records asked for are missing from the start of the history.
    """
    history = History(directory)
    first = history.first_record_seq()
    since_seq = args.since_seq if args.since_seq is not None else 1
    since_ts = record_ts(args.since) if args.since is not None else None
    until_ts = record_ts(args.until) if args.until is not None else None
    # Records removed from the start (not compacted away) are damage, reported after the
    # output, unless no record asked for is among them.
    gap = history.layout().missing_start()
    if gap is not None and args.since is None and since_seq > gap.last:
        gap = None
    if gap is None and first > 1 and (args.since is not None or since_seq < first):
        note(f"records before seq {first} are no longer retained (compacted without archive)")
    match = args.key.match if args.key is not None else None
    ops = set(args.op) if args.op else None
    out = sys.stdout.buffer
    progress = Progress("dump", segment_bytes(history.layout()))
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
    if gap is not None:
        raise gap.damage()
    return EXIT_OK

