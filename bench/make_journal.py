"""Write a valid journal of N put records (one key each, ~100-byte values) for replay tests.

    python bench/make_journal.py DATA_DIR --records 1000000 [--keys 100000]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from kvd.log.format import GENESIS_HASH, encode_record, format_ts, segment_name


def make_journal(
    directory: Path, records: int, keys: int, value_bytes: int = 100, *, shuffled: bool = False
) -> int:
    """Returns the number of bytes written.

    Record ``seq`` writes key number ``seq % keys``; ``shuffled`` numbers the
    keys in a random (seeded) order instead, as real keys arrive: start-up
    then sorts them for the ordered index, which key order makes cheap or not.
    """
    directory.mkdir(parents=True, exist_ok=True)
    names = list(range(keys))
    if shuffled:
        random.Random(20261128).shuffle(names)
    prev = GENESIS_HASH
    ts = format_ts(1_800_000_000.0)
    size = 0
    with open(directory / segment_name(1), "wb") as out:
        for seq in range(1, records + 1):
            value = b'"value-%08d-' % seq + b"x" * (value_bytes - 15) + b'"'
            line, prev = encode_record(
                seq=seq, ts=ts, op="put", prev=prev, set_values={f"key{names[seq % keys]:08d}": value}
            )
            out.write(line)
            size += len(line)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=None, help="distinct keys (default: records)")
    parser.add_argument("--shuffled", action="store_true", help="keys first written in random order")
    args = parser.parse_args()
    size = make_journal(args.data_dir, args.records, args.keys or args.records, shuffled=args.shuffled)
    print(f"wrote {args.records} records, {size / 1e6:.1f} MB to {args.data_dir}")


if __name__ == "__main__":
    main()
