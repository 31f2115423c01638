"""Compaction under load: how long compacting 1M live keys takes, and request p99 while it runs.

    python bench/compaction.py [--keys 1000000] [--records 2000000] [--duration 10] [--repeats 3]
    python bench/compaction.py --smoke     # ~10 s: 20k keys, 2 s rounds, 1 repeat

It writes one journal with bench/make_journal.py: RECORDS put records over
KEYS names (the defaults leave half the journal dead), ~100-byte values.
Then, REPEATS times, on a fresh copy of it, it starts ``kvd serve --port 0
--fsync always`` pinned to core 0 (automatic compaction held off with
``KVD_JOURNAL_COMPACT_CHECK_SECONDS``), preloads the suite's working set
k0..k(N-1) (N = --wrk-keys, 10k; bench/wrk/kv.lua names its keys so, and
the journal's keys are named otherwise, so kvd holds KEYS + N) and runs the
suite's ``mixed`` workload (90% GET, 10% PUT of a random working-set key,
64 connections), the client on core 1, in these rounds:

1. wrk idle: bench/wrk/kv.lua for DURATION s, the figures of bench/run.py;
2. idle: the same load from this script's own client for DURATION s;
3. compaction: the same client; after LEAD s (1) a thread sends
   ``POST /journal/compact`` and times it; the load goes on until the
   answer and TAIL s (1) more;
4. a second compaction right after, with no load: what writing the
   snapshot costs when kvd has its core to itself (a lighter job: it
   retires one snapshot and a small segment, not the dead journal).

The during-compaction figures come from a window of exactly the compaction:
the client records (start, end, status) of every request, and p50/p99/max
are taken over the requests in flight at any moment between sending the
POST and reading its answer (start < answered and end > sent); req/s counts
the answers within the window. wrk can't do that: it reports one histogram
per run, runs whole seconds, and its Lua hooks can't pair a response with
its request's start. Sizing a wrk run to the compaction would mix seconds of
idle load into the p99, and a wrk run through a compaction of its own would
need a second compaction, of a journal with nothing dead left to retire.
The idle p99 compared against is the same client's over its whole idle
round, on the same server a minute earlier, so the ratio compares like
with like.

The client is asyncio (uvloop when installed) with one Protocol per
connection and pre-formatted requests, a closed loop like wrk: each
connection sends its next request when the answer is read. A Python client
could itself be the bottleneck, so round 1 is there to check it: the
table shows its idle req/s and p50 over wrk's, and its CPU share of core 1.
Being a closed loop (wrk is one too), the client sends less when kvd slows
down, so the p99 ratio tracks the throughput lost; a load arriving at a
fixed rate above what kvd serves during the compaction would queue instead.

Peak RSS per round: VmHWM after resetting it (``/proc/PID/clear_refs``
``5``) at the round's start, or, where the reset isn't allowed, the
highest VmRSS sampled every 20 ms. Prints medians over the repeats, the
compaction's own ``seconds`` and the client's view of it, the ratio
p99(compaction)/p99(idle) against the target (<= 3x), and writes
bench/results/compaction.json (smoke: compaction-smoke.json) with every
round, the compaction window's 250 ms timeline included.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import servers
from make_journal import make_journal
from run import machine_info, run_wrk
from servers import BENCH_DIR, HOST, KVD_PATH_HELP, REPO_ROOT, VALUE, Options, Running, call

P99_RATIO_TARGET = 3.0
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
TIMELINE_BUCKET_S = 0.25

# --- the load generator ------------------------------------------------------------------


@dataclass
class Samples:
    """Every request of one round: when it was sent and answered (time.monotonic()), its status."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    socket_errors: int = 0
    began: float = 0.0
    finished: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time over the round (user + system)


class _Load:
    """What every connection of one round shares: the requests to pick from, the samples."""

    def __init__(self, host_header: str, keys: int, put_percent: int) -> None:
        value = VALUE.encode()
        self.gets = [f"GET /keys/k{i} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
                     for i in range(keys)]
        self.puts = [(f"PUT /keys/k{i} HTTP/1.1\r\nHost: {host_header}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(value)}\r\n\r\n"
                      ).encode() + value for i in range(keys)]
        self.put_share = put_percent / 100
        self.samples = Samples()
        self.stopping = False


class _Connection(asyncio.Protocol):
    """One keep-alive connection in a closed loop: the next request goes once the answer is read."""

    def __init__(self, load: _Load, rng: random.Random, closed: asyncio.Future[None]) -> None:
        self.load = load
        self.rng = rng
        self.closed = closed
        self.buffer = bytearray()
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        load = self.load
        if load.stopping:
            self.transport.close()
            return
        pool = load.puts if self.rng.random() < load.put_share else load.gets
        request = pool[self.rng.randrange(len(pool))]
        self.sent = time.monotonic()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        found = CONTENT_LENGTH.search(buffer, 0, head_end + 2)
        total = head_end + 4 + (int(found.group(1)) if found else 0)
        if len(buffer) < total:
            return
        answered = time.monotonic()
        samples = self.load.samples
        samples.starts.append(self.sent)
        samples.ends.append(answered)
        samples.statuses.append(int(buffer[9:12]))
        del buffer[:total]  # one request in flight per connection: nothing follows
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.load.stopping:
            self.load.samples.socket_errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


async def drive(url: str, keys: int, put_percent: int, connections: int, seed: int,
                during: Callable[[], Awaitable[object]], stop_timeout: float = 30.0) -> tuple[Samples, object]:
    """Run the mixed load over ``connections`` connections while ``during()`` runs; (samples, its result)."""
    parts = urlsplit(url)
    load = _Load(f"{parts.hostname}:{parts.port}", keys, put_percent)
    loop = asyncio.get_running_loop()
    closed: list[asyncio.Future[None]] = []
    transports = []
    for index in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        rng = random.Random(seed * 1_000_003 + index)
        transport, _ = await loop.create_connection(
            lambda rng=rng, done=done: _Connection(load, rng, done), parts.hostname, parts.port)
        closed.append(done)
        transports.append(transport)
    cpu_before = _cpu_seconds()
    load.samples.began = time.monotonic()
    try:
        result = await during()
    finally:
        load.stopping = True  # each connection closes once its request in flight is answered
        _, late = await asyncio.wait(closed, timeout=stop_timeout)
        for transport in transports:
            transport.abort()
        load.samples.socket_errors += len(late)
    load.samples.finished = time.monotonic()
    load.samples.cpu_s = _cpu_seconds() - cpu_before
    return load.samples, result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_async(coroutine: Awaitable[object]) -> object:
    """Run on uvloop when it is installed (a cheaper client), else on asyncio's default loop."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


# --- summaries ---------------------------------------------------------------------------


def percentile(ordered: list[float], p: float) -> float:
    """Nearest rank on an ascending list."""
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(samples: Samples, window: tuple[float, float] | None = None) -> dict:
    """Latency of the requests in flight at some moment of ``window`` (default: the whole round)."""
    low, high = window or (samples.began, samples.finished)
    picked = [(end - start, status) for start, end, status
              in zip(samples.starts, samples.ends, samples.statuses, strict=True)
              if start < high and end > low]
    latencies = sorted(latency * 1000 for latency, _ in picked)
    answered = sum(1 for end in samples.ends if low <= end <= high)
    seconds = high - low
    non_2xx = sum(1 for _, status in picked if not 200 <= status < 300)
    return {
        "seconds": round(seconds, 3),
        "requests": len(picked),
        "rps": answered / seconds if seconds > 0 else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else float("nan"),
        "non_2xx": non_2xx,
        "socket_errors": samples.socket_errors,
        "errors": non_2xx + samples.socket_errors,
    }


def timeline(samples: Samples, origin: float) -> list[dict]:
    """Answers per TIMELINE_BUCKET_S bucket (by answer time), with the bucket's p99 and max."""
    buckets: dict[int, list[float]] = {}
    for start, end in zip(samples.starts, samples.ends, strict=True):
        buckets.setdefault(int((end - origin) // TIMELINE_BUCKET_S), []).append((end - start) * 1000)
    rows = []
    for index in sorted(buckets):
        ordered = sorted(buckets[index])
        rows.append({"t_s": round(index * TIMELINE_BUCKET_S, 3), "answers": len(ordered),
                     "p99_ms": round(percentile(ordered, 99), 2), "max_ms": round(ordered[-1], 2)})
    return rows


# --- the server and its memory ------------------------------------------------------------


def start_kvd(run_dir: Path, opts: Options, timeout: float) -> tuple[Running, float]:
    """kvd on ``run_dir/store``, fsync always, automatic compaction held off; (server, seconds to ready)."""
    log = run_dir / "kvd.log"
    env = servers.kvd_env(opts)
    env["KVD_JOURNAL_COMPACT_CHECK_SECONDS"] = "100000"  # only the benchmark's POST compacts
    argv = [opts.python, "-m", "kvd", "serve", "--port", "0", "--data-dir", str(run_dir / "store"),
            "--fsync", "always", "--log-level", "info"]
    started = time.monotonic()
    proc = servers.spawn(argv, log, opts, cwd=run_dir, env=env)
    running = Running("kvd", "", run_dir, [proc], [log])
    try:
        running.url = f"http://{HOST}:{servers.wait_for_port_line(proc, log, timeout)}"
        servers.wait_until(lambda: call(running.url, "GET", "/readyz", timeout=5)[0] == 200,
                           proc, "/readyz", timeout=max(1.0, started + timeout - time.monotonic()))
    except servers.StartError as exc:
        running.stop()
        raise servers.StartError(f"{exc}\n{running.log_tail()}") from None
    return running, time.monotonic() - started


class PeakRss:
    """The server's peak RSS over a with-block: VmHWM reset at the start, else VmRSS sampled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sampled_kib = 0
        self.start_kib = 0
        self.reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.sampled_kib = max(self.sampled_kib, servers.proc_memory_kib(self.pid)[1])

    def __enter__(self) -> PeakRss:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.reset = True
        except OSError:
            self.reset = False
        self.start_kib = self.sampled_kib = servers.proc_memory_kib(self.pid)[1]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        hwm, rss = servers.proc_memory_kib(self.pid)
        self.sampled_kib = max(self.sampled_kib, rss)
        self.peak_kib = hwm if self.reset and hwm else self.sampled_kib

    def figures(self) -> dict:
        return {"rss_start_mib": self.start_kib / 1024, "rss_peak_mib": self.peak_kib / 1024,
                "rss_sampled_peak_mib": self.sampled_kib / 1024, "peak_from": "VmHWM" if self.reset
                else "sampled VmRSS"}


# --- one repeat --------------------------------------------------------------------------


def wrk_args(args: argparse.Namespace) -> argparse.Namespace:
    """The fields bench/run.py's run_wrk reads."""
    return argparse.Namespace(client_pin=args.client_pin, threads=args.threads,
                              connections=args.connections, timeout=10.0, keys=args.wrk_keys,
                              put_percent=args.put_percent)


def idle_round(args: argparse.Namespace, running: Running, seed: int) -> dict:
    async def wait() -> None:
        await asyncio.sleep(args.duration)

    with PeakRss(running.procs[0].pid) as rss:
        samples, _ = run_async(drive(running.url, args.wrk_keys, args.put_percent,
                                     args.connections, seed, wait))
    result = summarize(samples)
    result["client_cpu_share"] = samples.cpu_s / (samples.finished - samples.began)
    result.update(rss.figures())
    return result


def compaction_round(args: argparse.Namespace, running: Running, seed: int) -> dict:
    posted: dict = {}

    def compact() -> None:
        posted["sent"] = time.monotonic()
        status, body = call(running.url, "POST", "/journal/compact", timeout=args.timeout)
        posted["answered"] = time.monotonic()
        posted["status"] = status
        posted["body"] = body

    async def lead_compact_tail() -> None:
        await asyncio.sleep(args.lead)
        await asyncio.get_running_loop().run_in_executor(None, compact)
        await asyncio.sleep(args.tail)

    with PeakRss(running.procs[0].pid) as rss:
        samples, _ = run_async(drive(running.url, args.wrk_keys, args.put_percent,
                                     args.connections, seed, lead_compact_tail))
    if posted.get("status") != 200:
        raise RuntimeError(f"POST /journal/compact answered {posted.get('status')}: "
                           f"{posted.get('body', b'')[:300]!r}\n{running.log_tail()}")
    window = (posted["sent"], posted["answered"])
    result = summarize(samples, window)
    result["report"] = json.loads(posted["body"])
    result["client_seconds"] = window[1] - window[0]
    result["round"] = summarize(samples)
    result["client_cpu_share"] = samples.cpu_s / (samples.finished - samples.began)
    result["window_from_s"] = round(window[0] - samples.began, 3)
    result["timeline"] = timeline(samples, samples.began)
    result.update(rss.figures())
    return result


def unloaded_compaction(running: Running, timeout: float) -> dict:
    """A second compaction with no load: what the snapshot costs when it has the core to itself.

    One PUT first, so there is a record past the first snapshot to compact.
    """
    time.sleep(1.0)
    status, _ = call(running.url, "PUT", "/keys/unloaded-probe", VALUE.encode(), "application/json")
    if status not in (200, 201):
        raise RuntimeError(f"PUT before the unloaded compaction answered {status}")
    sent = time.monotonic()
    status, body = call(running.url, "POST", "/journal/compact", timeout=timeout)
    answered = time.monotonic()
    if status != 200:
        raise RuntimeError(f"unloaded POST /journal/compact answered {status}: {body[:300]!r}")
    return {"report": json.loads(body), "client_seconds": answered - sent}


def check_after(running: Running, keys: int, wrk_keys: int) -> None:
    """The store still answers a journal key and the working set after the compaction."""
    for key in (f"key{keys // 2:08d}", f"k{wrk_keys // 2}"):
        status, _ = call(running.url, "GET", f"/keys/{key}")
        if status != 200:
            raise RuntimeError(f"GET /keys/{key} answered {status} after the compaction")


def one_repeat(args: argparse.Namespace, opts: Options, pristine: Path, work: Path,
               repeat: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"run{repeat}-", dir=work))
    shutil.copytree(pristine, run_dir / "store")
    running, ready_s = start_kvd(run_dir, opts, args.timeout)
    try:
        servers.preload("bulk", running.url, args.wrk_keys)
        servers.check_answers("kvd", running.url, args.wrk_keys)

        async def warm() -> None:
            await asyncio.sleep(args.warmup)

        if args.warmup > 0:
            run_async(drive(running.url, args.wrk_keys, args.put_percent, args.connections,
                            1000 + repeat, warm))
        with PeakRss(running.procs[0].pid) as rss:
            idle_wrk = run_wrk(wrk_args(args), running.url, "kvd", "mixed", args.duration, seed=repeat)
        idle_wrk.pop("wrk", None)
        idle_wrk.update(rss.figures())
        idle = idle_round(args, running, seed=2000 + repeat)
        compaction = compaction_round(args, running, seed=3000 + repeat)
        if not running.alive():
            raise RuntimeError(f"kvd died during the rounds\n{running.log_tail()}")
        check_after(running, args.keys, args.wrk_keys)
        return {"repeat": repeat + 1, "ready_s": ready_s, "idle_wrk": idle_wrk, "idle": idle,
                "compaction": compaction, "unloaded": unloaded_compaction(running, args.timeout)}
    finally:
        running.stop()
        if args.keep:
            print(f"  kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


# --- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: 20k keys over 40k records, 2 s rounds, 1 repeat, 1000-key working set")
    parser.add_argument("--keys", type=int, help="live keys in the journal (default 1000000)")
    parser.add_argument("--records", type=int, help="records in the journal (default 2 x keys)")
    parser.add_argument("--wrk-keys", type=int, help="working set k0..k(N-1) the load uses (default 10000)")
    parser.add_argument("--duration", type=float, help="seconds per idle round (default 10)")
    parser.add_argument("--repeats", type=int, help="fresh servers, each idle then compaction (default 3)")
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load first (default 2)")
    parser.add_argument("--lead", type=float, default=1.0, help="seconds of load before the POST (default 1)")
    parser.add_argument("--tail", type=float, default=1.0, help="seconds of load after its answer (default 1)")
    parser.add_argument("--connections", type=int, default=64, help="connections (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--put-percent", type=int, default=10, help="writes in the mixed load (default 10)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for ready, and for the compaction's answer")
    parser.add_argument("--python", default=sys.executable, help="interpreter for kvd")
    parser.add_argument("--kvd-path", type=Path, default=REPO_ROOT, help=KVD_PATH_HELP)
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list for kvd (default 0)")
    parser.add_argument("--client-cpu", default="1", help="CPU list for wrk and this script's client (default 1)")
    parser.add_argument("--work-dir", type=Path, help="where the journal and data directories go (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep each repeat's data directory and log")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/compaction.json; "
                        "smoke: bench/results/compaction-smoke.json)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.keys = args.keys if args.keys is not None else (20_000 if smoke else 1_000_000)
    args.records = args.records if args.records is not None else 2 * args.keys
    args.wrk_keys = args.wrk_keys if args.wrk_keys is not None else (1000 if smoke else 10_000)
    args.duration = args.duration if args.duration is not None else (2.0 if smoke else 10.0)
    args.repeats = args.repeats if args.repeats is not None else (1 if smoke else 3)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if smoke else 2.0)
    if smoke:
        args.lead, args.tail = min(args.lead, 0.5), min(args.tail, 0.5)
    if args.json is None:
        args.json = BENCH_DIR / "results" / ("compaction-smoke.json" if smoke else "compaction.json")
    if args.records < args.keys or args.keys < 10 or args.wrk_keys < 10:
        parser.error("--records must be at least --keys; --keys and --wrk-keys at least 10")
    if args.duration <= 0 or args.repeats < 1 or args.connections < args.threads:
        parser.error("--duration must be positive, --repeats at least 1, --connections >= --threads")
    if float(args.duration) != int(args.duration):
        parser.error("--duration must be whole seconds (wrk takes whole seconds)")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    args.server_pin = ("taskset", "-c", args.server_cpu) if pin else ()
    args.client_pin = ("taskset", "-c", args.client_cpu) if pin else ()
    return args


def _cpus(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _median(runs: list[dict], phase: str, keys: tuple[str, ...]) -> dict:
    return {key: statistics.median(run[phase][key] for run in runs) for key in keys}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    opts = Options(python=args.python, pin=args.server_pin, kvd_path=args.kvd_path.resolve())
    if args.client_pin:
        os.sched_setaffinity(0, _cpus(args.client_cpu))  # this script's client shares wrk's core
    machine = machine_info(args.python, opts.kvd_path)
    started = datetime.datetime.now(datetime.UTC)
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, "
          f"Linux {machine['kernel']}, {machine['python']}, {machine['wrk']}; "
          f"kvd {machine['kvd_commit']}; load average {machine['loadavg_start'][0]:.2f}")
    print(f"journal: {args.records} records over {args.keys} keys; working set {args.wrk_keys} keys; "
          f"mixed load ({args.put_percent}% PUT), {args.connections} connections; "
          f"{args.duration:g} s idle rounds x {args.repeats} repeats; "
          + (f"kvd on CPU {args.server_cpu}, clients on CPU {args.client_cpu}" if args.server_pin
             else "not pinned"))

    work = Path(tempfile.mkdtemp(prefix="kvd-compaction-", dir=args.work_dir))
    runs: list[dict] = []
    try:
        pristine = work / "journal"
        print(f"writing {args.records} records over {args.keys} keys ...", file=sys.stderr, flush=True)
        written_at = time.monotonic()
        journal_bytes = make_journal(pristine, args.records, args.keys)
        journal = {"records": args.records, "keys": args.keys, "bytes": journal_bytes,
                   "write_s": time.monotonic() - written_at}
        for repeat in range(args.repeats):
            run = one_repeat(args, opts, pristine, work, repeat)
            runs.append(run)
            idle, comp, wrk = run["idle"], run["compaction"], run["idle_wrk"]
            print(f"  repeat {repeat + 1}: ready {run['ready_s']:.1f}s; wrk idle {wrk['rps']:.0f} req/s "
                  f"p99 {wrk['p99_ms']:.1f} ms; idle {idle['rps']:.0f} req/s p99 {idle['p99_ms']:.1f} ms; "
                  f"compaction {comp['report']['seconds']:.2f}s, {comp['rps']:.0f} req/s "
                  f"p99 {comp['p99_ms']:.1f} ms (x{comp['p99_ms'] / idle['p99_ms']:.2f}), "
                  f"RSS {idle['rss_peak_mib']:.0f} -> {comp['rss_peak_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    latency = ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "rss_peak_mib")
    median = {
        "idle_wrk": _median(runs, "idle_wrk", latency),
        "idle": _median(runs, "idle", (*latency, "client_cpu_share")),
        "compaction": _median(runs, "compaction", (*latency, "client_seconds", "client_cpu_share")),
    }
    median["compaction"]["seconds"] = statistics.median(r["compaction"]["report"]["seconds"] for r in runs)
    median["unloaded_seconds"] = statistics.median(r["unloaded"]["report"]["seconds"] for r in runs)
    per_repeat = [r["compaction"]["p99_ms"] / r["idle"]["p99_ms"] for r in runs]
    ratios = {
        "p99_compaction_over_idle": statistics.median(per_repeat),
        "p99_compaction_over_idle_per_repeat": per_repeat,
        "p99_ratio_of_medians": median["compaction"]["p99_ms"] / median["idle"]["p99_ms"],
        "p50_compaction_over_idle": statistics.median(
            r["compaction"]["p50_ms"] / r["idle"]["p50_ms"] for r in runs),
        "rps_compaction_over_idle": statistics.median(
            r["compaction"]["rps"] / r["idle"]["rps"] for r in runs),
        "rss_peak_compaction_over_idle": statistics.median(
            r["compaction"]["rss_peak_mib"] / r["idle"]["rss_peak_mib"] for r in runs),
        "rss_peak_compaction_minus_idle_mib": statistics.median(
            r["compaction"]["rss_peak_mib"] - r["idle"]["rss_peak_mib"] for r in runs),
        "compaction_s_loaded_over_unloaded": statistics.median(
            r["compaction"]["report"]["seconds"] / r["unloaded"]["report"]["seconds"] for r in runs),
        "client_rps_over_wrk": statistics.median(r["idle"]["rps"] / r["idle_wrk"]["rps"] for r in runs),
        "client_p50_over_wrk": statistics.median(
            r["idle"]["p50_ms"] / r["idle_wrk"]["p50_ms"] for r in runs),
    }
    value = ratios["p99_compaction_over_idle"]
    met = value <= P99_RATIO_TARGET
    targets = [{
        "target": f"p99 during compaction <= {P99_RATIO_TARGET:g}x p99 idle (same client, same server)",
        "value": value, "goal": P99_RATIO_TARGET, "met": met,
        "note": "met" if met else f"missed: {value / P99_RATIO_TARGET:.2f}x the limit",
    }]
    errors = sum(r[phase]["errors"] for r in runs for phase in ("idle_wrk", "idle", "compaction"))
    report = runs[0]["compaction"]["report"]

    print()
    print(f"median of {args.repeats} repeats, each on a fresh kvd (fsync always) holding "
          f"{report['keys']} keys; compaction window = POST sent .. answered")
    header = (f"{'round':<22} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
              f"{'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for label, phase in (("idle (wrk)", "idle_wrk"), ("idle (client)", "idle"),
                         ("compaction (client)", "compaction")):
        m = median[phase]
        print(f"{label:<22} {m['rps']:>7.0f} {m['p50_ms']:>8.1f} {m['p90_ms']:>8.1f} {m['p99_ms']:>8.1f} "
              f"{m['max_ms']:>8.1f} {m['rss_peak_mib']:>12.1f}")
    c = median["compaction"]
    print(f"\ncompaction of {report['keys']} keys: {c['seconds']:.2f} s (kvd's report; "
          f"{c['client_seconds']:.2f} s POST to answer), {report['segments_retired']} segments "
          f"retired, {report['bytes_before'] / 1e6:.0f} -> {report['bytes_after'] / 1e6:.0f} MB")
    print(f"a second compaction right after, with no load: {median['unloaded_seconds']:.2f} s "
          f"(the loaded one took {c['seconds'] / median['unloaded_seconds']:.2f}x as long)")
    print(f"p99 compaction / idle: {value:.2f} (per repeat "
          f"{', '.join(f'{r:.2f}' for r in per_repeat)}; ratio of medians "
          f"{ratios['p99_ratio_of_medians']:.2f}); p50 x{ratios['p50_compaction_over_idle']:.2f}; "
          f"req/s x{ratios['rps_compaction_over_idle']:.2f}")
    print(f"peak RSS compaction / idle: {ratios['rss_peak_compaction_over_idle']:.2f} "
          f"(+{ratios['rss_peak_compaction_minus_idle_mib']:.0f} MiB)")
    print(f"client check: idle req/s {ratios['client_rps_over_wrk']:.2f}x wrk's, p50 "
          f"{ratios['client_p50_over_wrk']:.2f}x wrk's; client CPU {100 * median['idle']['client_cpu_share']:.0f}% "
          f"of its core idle, {100 * c['client_cpu_share']:.0f}% in the compaction round")
    print(f"errors (non-2xx + socket, all rounds): {errors}")
    print("\ntargets:")
    for row in targets:
        print(f"  {'MET   ' if row['met'] else 'MISSED'}  {row['target']}: {row['value']:.2f}; {row['note']}")

    machine["loadavg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "params": {"keys": args.keys, "records": args.records, "wrk_keys": args.wrk_keys,
                   "duration_s": args.duration, "repeats": args.repeats, "warmup_s": args.warmup,
                   "lead_s": args.lead, "tail_s": args.tail, "connections": args.connections,
                   "threads": args.threads, "put_percent": args.put_percent, "fsync": "always",
                   "server_pin": " ".join(args.server_pin) or None,
                   "client_pin": " ".join(args.client_pin) or None, "smoke": args.smoke},
        "journal": journal,
        "median": median,
        "ratios": ratios,
        "errors": errors,
        "targets": targets,
        "runs": runs,
    }, indent=1) + "\n")
    print(f"\nresults: {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
