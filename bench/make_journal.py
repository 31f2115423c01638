"""Write a valid journal of N put records (one key each, ~100-byte values) for replay tests.

    python bench/make_journal.py DATA_DIR --records 1000000 [--keys 100000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvd.log.format import GENESIS_HASH, encode_record, format_ts, segment_name


def make_journal(directory: Path, records: int, keys: int, value_bytes: int = 100) -> int:
    """Returns the number of bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    prev = GENESIS_HASH
    ts = format_ts(1_800_000_000.0)
    size = 0
    with open(directory / segment_name(1), "wb") as out:
        for seq in range(1, records + 1):
            value = b'"value-%08d-' % seq + b"x" * (value_bytes - 15) + b'"'
            line, prev = encode_record(
                seq=seq, ts=ts, op="put", prev=prev, set_values={f"key{seq % keys:08d}": value}
            )
            out.write(line)
            size += len(line)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=None, help="distinct keys (default: records)")
    args = parser.parse_args()
    size = make_journal(args.data_dir, args.records, args.keys or args.records)
    print(f"wrote {args.records} records, {size / 1e6:.1f} MB to {args.data_dir}")


if __name__ == "__main__":
    main()
