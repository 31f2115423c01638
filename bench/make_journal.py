"""Write a valid journal of N put records (one key each, ~100-byte values) for replay tests.

    python bench/make_journal.py DATA_DIR --records 1000000 [--keys 100000]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from kvd.log.format import GENESIS_HASH, encode_record, format_ts, segment_name
from kvd.log.seal import write_seal


def make_journal(
    directory: Path, records: int, keys: int, value_bytes: int = 100, *, shuffled: bool = False,
    segment_bytes: int | None = None, seal: bool = False,
) -> int:
    """Returns the number of bytes written.

    Record ``seq`` writes key number ``seq % keys``; ``shuffled`` numbers the
    keys in a random (seeded) order instead, as real keys arrive: start-up
    then sorts them for the ordered index, which key order makes cheap or not.
    ``segment_bytes`` starts a new segment once one holds that many bytes, as
    the server does (None: one segment); ``seal`` then seals every finished
    one, as the server's sealer would have after each roll (kvd/log/seal.py).
    """
    directory.mkdir(parents=True, exist_ok=True)
    names = list(range(keys))
    if shuffled:
        random.Random(20261128).shuffle(names)
    prev = GENESIS_HASH
    ts = format_ts(1_800_000_000.0)
    size = in_segment = 0
    segments = [directory / segment_name(1)]
    out = open(segments[0], "wb")  # noqa: SIM115  # replaced at each roll
    try:
        for seq in range(1, records + 1):
            if segment_bytes is not None and in_segment >= segment_bytes:
                out.close()
                segments.append(directory / segment_name(seq))
                out = open(segments[-1], "wb")  # noqa: SIM115
                in_segment = 0
            value = b'"value-%08d-' % seq + b"x" * (value_bytes - 15) + b'"'
            line, prev = encode_record(
                seq=seq, ts=ts, op="put", prev=prev, set_values={f"key{names[seq % keys]:08d}": value}
            )
            out.write(line)
            size += len(line)
            in_segment += len(line)
    finally:
        out.close()
    if seal:
        for finished in segments[:-1]:
            write_seal(finished)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=None, help="distinct keys (default: records)")
    parser.add_argument("--shuffled", action="store_true", help="keys first written in random order")
    parser.add_argument("--segment-bytes", type=int, default=None,
                        help="start a new segment past this many bytes, as the server does (default: one)")
    parser.add_argument("--seal", action="store_true", help="seal the finished segments, as the server does")
    args = parser.parse_args()
    size = make_journal(args.data_dir, args.records, args.keys or args.records, shuffled=args.shuffled,
                        segment_bytes=args.segment_bytes, seal=args.seal)
    print(f"wrote {args.records} records, {size / 1e6:.1f} MB to {args.data_dir}")


if __name__ == "__main__":
    main()
