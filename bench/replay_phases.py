"""Where a journal replay's time goes, phase by phase, in one thread: what a faster start-up would have to remove.

    python bench/replay_phases.py [--records 1000000] [--repeats 3] [--journal PATH]

Writes a journal of RECORDS simple puts with bench/make_journal.py (keys in
random order, as bench/replay.py does) unless --journal names one, then runs
kvd's own start-up fast path over it in-process, block by block, timing each
phase: reading, the regular expression's split (``split_block``), the
checks (``check_run``: every record's SHA-256, the seqs, the chain), the dict
updates, and the sort the ordered index needs. Beside them, in the same run:

- one SHA-256 per record through hashlib, alone;
- the whole file through ``hashlib.sha256`` and ``zlib.crc32``: what a
  whole-segment digest would cost instead of the per-record hashes;
- with a C compiler and OpenSSL's headers, one SHA-256 per record from C
  (OpenSSL's ``SHA256()``): whether the per-record hash costs Python or CPU;
- with msgspec importable, ``Decoder.decode_lines`` into a Struct with
  ``msgspec.Raw`` values, columns checked and applied with C-level maps.

Prints the median of REPEATS for each, in seconds and per record. Not a
target check (bench/replay.py is): a map of where the time goes.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from itertools import chain
from operator import add, attrgetter
from pathlib import Path

from make_journal import make_journal
from servers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from kvd.log.lines import line_blocks  # noqa: E402
from kvd.log.simple_puts import Run, check_run, split_block  # noqa: E402
from kvd.store import _REVISION  # noqa: E402

BLOCK_BYTES = 1024 * 1024  # the reader's block

C_HASH = r"""
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "rb"); long n = atol(argv[2]);
    static unsigned char line[1 << 20]; unsigned char digest[32];
    char **lines = malloc(sizeof(char *) * n); size_t *sizes = malloc(sizeof(size_t) * n);
    long count = 0;
    while (count < n && fgets((char *)line, sizeof line, f)) {
        size_t size = 0; while (line[size] != '\n') size++;
        sizes[count] = size - 75; lines[count] = malloc(size); memcpy(lines[count], line, size); count++;
    }
    struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < count; i++) SHA256((unsigned char *)lines[i], sizes[i], digest);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%ld %.6f\n", count, (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


def phases(path: Path) -> tuple[int, dict[str, float]]:
    """kvd's fast path over the whole file: (keys, seconds per phase)."""
    spent = dict.fromkeys(("read", "split", "check", "apply"), 0.0)
    packed: dict[str, bytes] = {}
    with open(path, "rb") as file:
        blocks = line_blocks(file, 0, None, BLOCK_BYTES)
        while True:
            started = time.perf_counter()
            block = next(blocks, None)
            if block is None:
                break
            read = time.perf_counter()
            pieces = split_block(block)
            split = time.perf_counter()
            runs = [check_run(piece) for piece in pieces if isinstance(piece, Run)]
            checked = time.perf_counter()
            for puts in runs:
                assert puts is not None, "not a journal of simple puts"
                revisions = map(_REVISION.pack, range(puts.first_seq, puts.first_seq + len(puts)))
                packed.update(zip(puts.keys, map(add, puts.values, revisions), strict=True))
            applied = time.perf_counter()
            for name, took in (("read", read - started), ("split", split - read),
                               ("check", checked - split), ("apply", applied - checked)):
                spent[name] += took
    started = time.perf_counter()
    sorted(packed)
    spent["index sort"] = time.perf_counter() - started
    return len(packed), spent


def hash_each(path: Path) -> float:
    lines = path.read_bytes().split(b"\n")[:-1]
    started = time.perf_counter()
    for line in lines:
        hashlib.sha256(line[:-75]).digest()
    return time.perf_counter() - started


def whole_file(path: Path, digest: Callable[[bytes], object]) -> float:
    data = path.read_bytes()
    started = time.perf_counter()
    digest(data)
    return time.perf_counter() - started


def hash_each_in_c(path: Path, records: int) -> float | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as scratch:
        source, binary = Path(scratch) / "hash.c", Path(scratch) / "hash"
        source.write_text(C_HASH)
        built = subprocess.run([compiler, "-O2", "-o", str(binary), str(source), "-lcrypto"],
                               capture_output=True)
        if built.returncode != 0:
            return None  # no OpenSSL headers
        out = subprocess.run([str(binary), str(path), str(records)], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[1])


def msgspec_columns(path: Path) -> float | None:
    try:
        import msgspec
    except ImportError:
        return None

    record = msgspec.defstruct("Record", [  # only the fields replay needs; others are skipped
        ("seq", int), ("op", str),
        ("set", dict[str, msgspec.Raw] | None, None), ("expires", dict[str, str] | None, None),
    ])
    decoder = msgspec.json.Decoder(record)
    sets_of, seq_of, op_of, expires_of = (attrgetter(name) for name in ("set", "seq", "op", "expires"))
    packed: dict[str, bytes] = {}
    started = time.perf_counter()
    with open(path, "rb") as file:
        for block in line_blocks(file, 0, None, BLOCK_BYTES):
            records = decoder.decode_lines(block)
            first = records[0].seq
            sets = list(map(sets_of, records))
            assert set(map(op_of, records)) == {"put"} and not any(map(expires_of, records))
            assert sum(map(len, sets)) == len(records)
            assert list(map(seq_of, records)) == list(range(first, first + len(records)))
            values = map(bytes, chain.from_iterable(map(dict.values, sets)))
            revisions = map(_REVISION.pack, range(first, first + len(records)))
            packed.update(zip(chain.from_iterable(sets), map(add, values, revisions), strict=True))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--journal", type=Path, help="a segment of simple puts to use instead")
    args = parser.parse_args()
    gc.disable()  # as kvd's replay runs: nothing it builds is garbage until it is done
    with tempfile.TemporaryDirectory(prefix="kvd-phases-") as scratch:
        path = args.journal
        if path is None:
            make_journal(Path(scratch), args.records, args.records, shuffled=True)
            path = next(Path(scratch).glob("*.jsonl"))
        size = path.stat().st_size
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            records, found = phases(path)
            for name, took in found.items():
                runs.setdefault(name, []).append(took)
            for name, measure in (
                ("sha256 per record (hashlib)", lambda: hash_each(path)),
                ("sha256 per record (C, OpenSSL)", lambda records=records: hash_each_in_c(path, records)),
                ("sha256 whole file", lambda: whole_file(path, hashlib.sha256)),
                ("crc32 whole file", lambda: whole_file(path, zlib.crc32)),
                ("msgspec decode+check+apply", lambda: msgspec_columns(path)),
            ):
                took = measure()
                if took is not None:
                    runs.setdefault(name, []).append(took)
                gc.collect()
    print(f"{records} records, {size / 1e6:.0f} MB, median of {args.repeats}, one thread (gc off)")
    print(f"{'phase':34s} {'s':>7s} {'us/record':>10s}")
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"{name:34s} {median:7.2f} {1e6 * median / records:10.2f}")
    kvd_path = sum(statistics.median(runs[name]) for name in ("split", "check", "apply", "index sort"))
    print(f"{'kvd fast path, all phases':34s} {kvd_path:7.2f} {1e6 * kvd_path / records:10.2f}")


if __name__ == "__main__":
    main()
