"""Listing fairness: small requests' latency while another client reads whole listings.

    python bench/listing_fairness.py [--keys 200000] [--duration 8] [--repeats 3]
    python bench/listing_fairness.py --smoke    # seconds: 20k keys, 1 s rounds, 1 repeat

A listing without ``limit`` works through the whole index: kvd streams it
and gives the loop to other requests every few milliseconds
(``give_way`` in kvd/handlers/keys.py). This measures what that is worth.
It starts ``kvd serve --port 0`` (fsync always, pinned to core 0), stores
KEYS keys k0..k(KEYS-1) with the suite's 100-byte value, and per repeat
runs the suite's ``get`` and ``put`` workloads with wrk (bench/wrk/kv.lua,
one thread, --connections, on core 1) twice each: alone, and while a
thread of this script reads ``GET /keys`` back to back, as fast as it can.
It prints p99, max and req/s of each round, medians over the repeats, and
the ratio that matters: p99 during listings over p99 alone. Exit status 1
when a request failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import servers
from run import machine_info, run_wrk
from servers import KVD_PATH_HELP, REPO_ROOT, Options

WORKLOADS = ("get", "put")
ROUNDS = ("alone", "during listings")


class ListingReader(threading.Thread):
    """Reads ``GET /keys`` back to back on one connection until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stopping = threading.Event()
        self.listings = 0
        self.bytes = 0
        self.errors = 0

    def run(self) -> None:
        port = urlsplit(self.url).port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while not self.stopping.is_set():
                status, body = servers.call(self.url, "GET", "/keys", conn=conn)
                if status != 200:
                    self.errors += 1
                    continue
                self.listings += 1
                self.bytes = len(body)
        except OSError:
            self.errors += 1
        finally:
            conn.close()


def measure(args: argparse.Namespace, url: str, workload: str, listing: bool, seed: int) -> dict:
    reader = ListingReader(url) if listing else None
    if reader is not None:
        reader.start()
        time.sleep(0.2)  # the first listing under way
    try:
        figures = run_wrk(args, url, "kvd", workload, args.duration, seed)
    finally:
        if reader is not None:
            reader.stopping.set()
            reader.join(timeout=120)
    figures.pop("wrk")
    if reader is not None:
        figures.update(listings=reader.listings, listing_bytes=reader.bytes)
        figures["errors"] += reader.errors
    return figures


def median_of(runs: list[dict]) -> dict:
    return {name: statistics.median(run[name] for run in runs)
            for name in ("rps", "p99_ms", "max_ms", "errors")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds: 20k keys, 1 s rounds, 1 repeat")
    parser.add_argument("--keys", type=int, help="keys stored and listed (default 200000; smoke: 20000)")
    parser.add_argument("--duration", type=float, help="seconds per round (default 8; smoke: 1)")
    parser.add_argument("--repeats", type=int, help="rounds of each kind; medians reported (default 3)")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections (default 4)")
    parser.add_argument("--timeout", type=float, default=10.0, help="wrk request timeout, seconds")
    parser.add_argument("--python", default=sys.executable, help="interpreter for kvd (default: this one)")
    parser.add_argument("--kvd-path", type=Path, default=REPO_ROOT, help=KVD_PATH_HELP)
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.keys = args.keys or (20_000 if args.smoke else 200_000)
    args.duration = args.duration or (1.0 if args.smoke else 8.0)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    args.server_pin = ("taskset", "-c", "0") if pin else ()
    args.client_pin = ("taskset", "-c", "1") if pin else ()
    # What run_wrk reads besides: one wrk thread, and the share of writes in `mixed` (unused).
    args.threads, args.put_percent = 1, 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(python=args.python, pin=args.server_pin, kvd_path=args.kvd_path.resolve())
    runs: dict[tuple[str, str], list[dict]] = {(w, r): [] for w in WORKLOADS for r in ROUNDS}
    with tempfile.TemporaryDirectory(prefix="kvd-listing-") as work:
        server = servers.start_kvd(Path(work), opts, fsync="always")
        try:
            servers.preload("bulk", server.url, args.keys)
            for repeat in range(args.repeats):
                for workload in WORKLOADS:
                    for round_ in ROUNDS:
                        runs[(workload, round_)].append(
                            measure(args, server.url, workload, round_ != "alone", seed=repeat + 1)
                        )
        finally:
            server.stop()
    medians = {f"{w} {r}": median_of(runs[(w, r)]) for w, r in runs}
    listed = [run for w in WORKLOADS for run in runs[(w, "during listings")]]
    listings = sum(run["listings"] for run in listed)
    print(f"listing fairness: {args.keys} keys, {args.repeats} repeat(s) of {args.duration:g} s, "
          f"{args.connections} wrk connection(s); medians")
    print(f"{'round':<22} {'req/s':>9} {'p99 ms':>8} {'max ms':>8} {'errors':>6}")
    for name, m in medians.items():
        print(f"{name:<22} {m['rps']:>9.0f} {m['p99_ms']:>8.2f} {m['max_ms']:>8.2f} {m['errors']:>6.0f}")
    ratios = {w: medians[f"{w} during listings"]["p99_ms"] / max(medians[f"{w} alone"]["p99_ms"], 1e-9)
              for w in WORKLOADS}
    print("p99 during listings / alone: " + ", ".join(f"{w} {ratios[w]:.2f}" for w in WORKLOADS))
    print(f"listings read: {listings}, {max(run['listing_bytes'] for run in listed) / 1e6:.1f} MB each")
    errors = sum(run["errors"] for kind in runs.values() for run in kind)
    print(f"errors (non-2xx + socket, all rounds): {errors}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": machine_info(args.python, opts.kvd_path),
            "params": {"keys": args.keys, "duration_s": args.duration, "repeats": args.repeats,
                       "connections": args.connections, "smoke": args.smoke},
            "runs": {f"{w} {r}": kind for (w, r), kind in runs.items()},
            "medians": medians, "p99_ratios": ratios, "listings": listings,
        }, indent=2) + "\n")
    return 1 if errors or not listings else 0


if __name__ == "__main__":
    sys.exit(main())
