"""kvd on NATS JetStream against kvd on its file journal: the backend's cost, and two nodes.

    python bench/nats.py [--duration 10] [--repeats 3] [--connections 64] [--threads 2]
                         [--workloads put,get,mixed] [--setups file-1,nats-1,nats-2]
    python bench/nats.py --smoke     # 1 s runs, 1 repeat, 1000 keys

Three setups, each driven by bench/wrk/kv.lua (bench/run.py's wrk runs):

- ``file-1``: one kvd on its file journal, ``fsync = always`` (the default):
  the baseline, the same server as bench/run.py's ``kvd``;
- ``nats-1``: one nats-server (``-js``, a fresh store directory) and one kvd
  with ``journal.backend = "nats"`` on it (stream ``KVD``, R1);
- ``nats-2``: one nats-server and two kvd nodes sharing its stream, each with
  its own data directory; two wrk processes at once, one per node, each with
  half the connections and half the wrk threads. Throughput is the sum of the
  two; p50, p99 and max are the worse of the two.

For every repeat, workload and setup everything is started afresh (free
loopback ports, fresh data and JetStream store directories), 10k keys are
preloaded through the first node (``PUT /keys``; the other node catches up
with a ``?consistent=1`` read) and checked on every node, then wrk warms up
and measures. Repeats go round all cells before the next, as in
bench/run.py, so a noisy minute hits every setup alike.

Pinning (2 cores): every server process (kvd nodes and nats-server) runs on
``--server-cpu`` (0), every wrk on ``--client-cpu`` (1), in every cell. So
``nats-2`` gives its two nodes and nats-server the one core ``nats-1`` had:
the 2-node / 1-node ratio says what a second node costs or gains for the
same server CPU, not what a second machine would add.

Each node's settings go into ``config/kvd.toml`` of its run directory (kvd's
working directory), and servers.start_kvd starts it as bench/run.py does.
Around the measured run the script reads each node's ``/metrics``: records
per commit (per fsync on the file journal, per message on NATS) and writes
decided again because the other node's message took the stream position
first (``kvd_nats_superseded_writes``) or answered 503 unconfirmed; and it
collects the warnings kvd logged during the run (wrk counts non-2xx answers
but cannot say which status they had). It prints a table of medians (req/s,
p50, p99, errors, peak RSS of a kvd node and of nats-server, records per
commit, writes decided again) and the ratios NATS 1 node / file 1 node and
2 nodes / 1 node on NATS, and writes bench/results/nats-latest.json (smoke:
nats-smoke.json). Exit status 1 when a cell could not run, and with --smoke
also when a request failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import servers
from run import _names, machine_info, median_of, run_wrk
from run import parse_args as run_parse_args
from servers import BENCH_DIR, HOST, Options, Running, StartError, call

WORKLOADS = ("put", "get", "mixed")
SETUPS = {
    "file-1": "one kvd, file journal, fsync=always (the default)",
    "nats-1": "one kvd on one nats-server (JetStream, R1 file stream)",
    "nats-2": "two kvd nodes on one nats-server, one stream; two wrk, half the connections each",
}
COUNTER = re.compile(r"^(kvd_nats_\w+|kvd_commit_batch_records_(?:sum|count)) ([0-9.e+-]+)$", re.M)
RATIOS = (("nats-1", "file-1", "NATS 1 node / file 1 node"),
          ("nats-2", "nats-1", "NATS 2 nodes / 1 node"))


# --- starting a setup --------------------------------------------------------------------


def nats_binary(explicit: str | None) -> str | None:
    """``--nats-server``, else ``$NATS_SERVER``, else PATH, else Debian's /usr/sbin."""
    chosen = explicit or os.environ.get("NATS_SERVER")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None)


def start_nats(run_dir: Path, opts: Options, binary: str) -> Running:
    """``nats-server -js`` on a free loopback port, JetStream store in ``run_dir/jetstream``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # a port handed out by free_port() may be taken meanwhile
        port = servers.free_port()
        log = run_dir / f"nats-{attempt}.log"
        proc = servers.spawn([binary, "-js", "-a", HOST, "-p", str(port), "-sd", str(run_dir / "jetstream")],
                             log, opts, cwd=run_dir)
        running = Running("nats-server", f"nats://{HOST}:{port}", run_dir, [proc], [log])
        try:
            servers.wait_until(lambda log=log: b"Server is ready" in log.read_bytes(), proc, "'Server is ready'")
            return running
        except StartError as exc:
            running.stop()
            if attempt == 2:
                raise StartError(f"nats-server: {exc}\n{running.log_tail()}") from None
    raise AssertionError("unreachable")


def start_node(run_dir: Path, opts: Options, nats_url: str | None) -> Running:
    """servers.start_kvd (fsync=always); on NATS through config/kvd.toml in its working directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if nats_url is not None:
        (run_dir / "config").mkdir(exist_ok=True)
        (run_dir / "config" / "kvd.toml").write_text(
            f'[journal]\nbackend = "nats"\n\n[journal.nats]\nservers = ["{nats_url}"]\n')
    try:  # kvd takes --port 0: no port race to retry
        return servers.start_kvd(run_dir, opts, fsync="always")
    except StartError as exc:
        tail = Running("kvd", "", run_dir, logs=[run_dir / "kvd.log"]).log_tail()
        raise StartError(f"kvd: {exc}\n{tail}") from None


@dataclass
class Setup:
    nodes: list[Running] = field(default_factory=list)
    nats: Running | None = None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.nats is not None:
            self.nats.stop()


def start_setup(name: str, base: Path, opts: Options, binary: str | None) -> Setup:
    setup = Setup()
    try:
        if name.startswith("nats"):
            assert binary is not None
            setup.nats = start_nats(base / "nats", opts, binary)
        for index in range(int(name.split("-")[1])):
            # One after the other: the first creates the stream, the second finds it.
            url = setup.nats.url if setup.nats is not None else None
            setup.nodes.append(start_node(base / f"node{index}", opts, url))
    except BaseException:
        setup.stop()
        raise
    return setup


# --- what the nodes say ------------------------------------------------------------------


def journal_counters(url: str) -> dict[str, float]:
    """The journal's counters from ``/metrics``: ``kvd_nats_*``, and the file journal's batches."""
    status, body = call(url, "GET", "/metrics", timeout=10)
    found = COUNTER.findall(body.decode(errors="replace")) if status == 200 else []
    return {name.removesuffix("_total"): float(value) for name, value in found}


def journal_figures(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict:
    """Over the measured run, all nodes: records per commit (fsync or NATS message), decided-again and 503 writes."""
    def total(name: str) -> float:
        return sum(a.get(name, 0.0) - b.get(name, 0.0) for b, a in zip(before, after, strict=True))

    nats = any(name.startswith("kvd_nats_") for name in after[0])
    records = total("kvd_nats_published_records" if nats else "kvd_commit_batch_records_sum")
    commits = total("kvd_nats_published_messages" if nats else "kvd_commit_batch_records_count")
    return {"commits": int(commits), "records_per_commit": records / commits if commits else None,
            "superseded": int(total("kvd_nats_superseded_writes")),
            "unconfirmed_503": int(total("kvd_nats_unconfirmed_writes"))}


def log_mark(node: Running) -> int:
    try:
        return node.logs[0].stat().st_size
    except OSError:
        return 0


def warnings_since(node: Running, mark: int) -> list[str]:
    """WARNING/ERROR/CRITICAL lines the node logged after byte ``mark``."""
    try:
        with open(node.logs[0], "rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]


# --- running one cell --------------------------------------------------------------------


def drive(args: argparse.Namespace, setup: Setup, workload: str, duration: float, seed: int) -> dict:
    """wrk against every node at once (connections and threads split between them); one result."""
    count = len(setup.nodes)
    jobs = []
    for index, node in enumerate(setup.nodes):
        share = argparse.Namespace(**vars(args))
        share.connections = args.connections // count + (index < args.connections % count)
        share.threads = max(1, args.threads // count)
        jobs.append((share, node.url, seed + 1000 * index))
    with ThreadPoolExecutor(count) as pool:
        parts = list(pool.map(lambda job: run_wrk(job[0], job[1], "kvd", workload, duration, job[2]), jobs))
    combined = {
        "rps": sum(part["rps"] for part in parts),
        "requests": sum(part["requests"] for part in parts),
        "seconds": max(part["seconds"] for part in parts),
        **{key: max(part[key] for part in parts) for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms")},
        **{key: sum(part[key] for part in parts) for key in ("non_2xx", "socket_errors", "errors")},
    }
    if count > 1:
        combined["per_node"] = [{k: v for k, v in part.items() if k != "wrk"} for part in parts]
    else:
        combined["wrk"] = parts[0]["wrk"]
    return combined


def run_cell(args: argparse.Namespace, opts: Options, name: str, workload: str, repeat: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"kvd-bench-{name}-", dir=opts.work_dir))
    setup: Setup | None = None
    try:
        setup = start_setup(name, base, opts, args.nats_binary)
        first = setup.nodes[0]
        servers.preload("bulk", first.url, args.keys)
        for node in setup.nodes[1:]:  # catch up with everything the first node wrote
            status, body = call(node.url, "GET", f"/keys/k{args.keys - 1}?consistent=1")
            if status != 200:
                raise RuntimeError(f"consistent read on the second node: {status} {body[:200]!r}")
        for node in setup.nodes:
            servers.check_answers("kvd", node.url, args.keys)
        if args.warmup > 0:
            drive(args, setup, workload, args.warmup, seed=1000 + repeat)
        marks = [log_mark(node) for node in setup.nodes]
        before = [journal_counters(node.url) for node in setup.nodes]
        result = drive(args, setup, workload, args.duration, seed=repeat)
        dead = [node for node in [*setup.nodes, setup.nats] if node is not None and not node.alive()]
        if dead:
            raise RuntimeError("died during the run: " + ", ".join(
                f"{node.name}\n{node.log_tail()}" for node in dead))
        peaks = [node.memory_kib()[0] / 1024 for node in setup.nodes]
        result["rss_hwm_mib"] = max(peaks)  # the largest node's peak (VmHWM)
        result["rss_mib"] = max(node.memory_kib()[1] / 1024 for node in setup.nodes)
        result["node_rss_hwm_mib"] = peaks
        result["nats_rss_hwm_mib"] = setup.nats.memory_kib()[0] / 1024 if setup.nats else 0.0
        result["journal"] = journal_figures(before, [journal_counters(node.url) for node in setup.nodes])
        result["log_warnings"] = [w[:300] for node, mark in zip(setup.nodes, marks, strict=True)
                                  for w in warnings_since(node, mark)][:50]
        return result
    finally:
        if setup is not None:
            setup.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


# --- summaries ---------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    summary = median_of(runs)
    summary["nats_rss_hwm_mib"] = statistics.median(run["nats_rss_hwm_mib"] for run in runs)
    summary["log_warnings"] = sum(len(run["log_warnings"]) for run in runs)
    per_commit = [run["journal"]["records_per_commit"] for run in runs if run["journal"]["records_per_commit"]]
    summary["records_per_commit"] = statistics.median(per_commit) if per_commit else None
    summary["superseded"] = sum(run["journal"]["superseded"] for run in runs)
    summary["unconfirmed_503"] = sum(run["journal"]["unconfirmed_503"] for run in runs)
    return summary


def ratios(medians: dict[str, dict[str, dict]]) -> list[dict]:
    rows = []
    for workload, by_setup in medians.items():
        for mine, other, text in RATIOS:
            a, b = by_setup.get(mine), by_setup.get(other)
            if not a or not b:
                continue
            rows.append({"workload": workload, "ratio": text, "of": mine, "to": other,
                         "rps": a["rps"] / b["rps"] if b["rps"] else None,
                         "p99": a["p99_ms"] / b["p99_ms"] if b["p99_ms"] else None})
    return rows


def journal_note(figures: dict) -> str:
    per = figures["records_per_commit"]
    return (f"records/commit {per:.1f}" if per else "no commits") + (
        f"  superseded {figures['superseded']}  503 {figures['unconfirmed_503']}")


def format_table(medians: dict[str, dict[str, dict]], order: list[str]) -> str:
    header = (f"{'workload':<8} {'setup':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>6} {'kvd RSS MiB':>11} {'nats RSS MiB':>12} {'rec/commit':>10} {'re-decided':>10}")
    lines = [header, "-" * len(header)]
    for workload, by_setup in medians.items():
        for name in order:
            cell = by_setup.get(name)
            if cell is not None:
                nats_rss = f"{cell['nats_rss_hwm_mib']:.1f}" if cell["nats_rss_hwm_mib"] else "-"
                per = f"{cell['records_per_commit']:.1f}" if cell["records_per_commit"] else "-"
                lines.append(f"{workload:<8} {name:<7} {cell['rps']:>8.0f} {cell['p50_ms']:>8.2f} "
                             f"{cell['p99_ms']:>8.2f} {cell['errors']:>6d} {cell['rss_hwm_mib']:>11.1f} "
                             f"{nats_rss:>12} {per:>10} {cell['superseded']:>10d}")
    return "\n".join(lines)


def format_ratios(rows: list[dict]) -> str:
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    return "\n".join(f"  {row['workload']:<6} {row['ratio']:<26} req/s {show(row['rps']):>5}   "
                     f"p99 {show(row['p99']):>5}" for row in rows)


# --- command line ------------------------------------------------------------------------


RUN_FLAGS = """\
Also bench/run.py's flags, with its defaults: --smoke (1 s runs, 1 repeat, no
warm-up, 1000 keys), --duration (10), --warmup (1), --repeats (3), --connections
(64), --threads (2), --timeout (10), --keys (10000), --put-percent (10), --python
(this interpreter; it needs nats-py), --no-pin, --server-cpu (0), --client-cpu
(1), --work-dir, --keep. Here --connections and --threads are totals, split
between the nodes, and --server-cpu pins the kvd nodes and nats-server.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's flags; the rest go through bench/run.py's parser, with its defaults."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False, epilog=RUN_FLAGS)
    parser.add_argument("--workloads", help=f"comma-separated, of {','.join(WORKLOADS)} (default all)")
    parser.add_argument("--setups", help=f"comma-separated, of {','.join(SETUPS)} (default all)")
    parser.add_argument("--nats-server", metavar="PATH",
                        help="nats-server binary (default: $NATS_SERVER, PATH, /usr/sbin)")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/nats-latest.json; "
                        "smoke: bench/results/nats-smoke.json)")
    ours, rest = parser.parse_known_args(argv)
    for flag in ("--servers", "--plot"):
        if any(arg.split("=", 1)[0] == flag for arg in rest):
            parser.error(f"{flag} is bench/run.py's only (here: --setups; no plot)")
    args = run_parse_args([*rest, "--servers", "kvd", "--plot", "none"])
    args.workloads = _names(ours.workloads, WORKLOADS, parser, "workload") if ours.workloads else list(WORKLOADS)
    args.setups = _names(ours.setups, SETUPS, parser, "setup") if ours.setups else list(SETUPS)
    args.json = ours.json or BENCH_DIR / "results" / ("nats-smoke.json" if args.smoke else "nats-latest.json")
    if args.connections < max(int(name.split("-")[1]) for name in args.setups):
        parser.error("--connections must be at least the number of nodes")
    args.nats_binary = nats_binary(ours.nats_server)
    if args.nats_binary is None and any(name.startswith("nats") for name in args.setups):
        parser.error("nats-server not found (apt-get install nats-server, or --nats-server PATH)")
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    return args


def progress(result: dict) -> str:
    return (f"{result['rps']:8.0f} req/s  p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
            f"max {result['max_ms']:7.1f} ms  errors {result['errors']}  RSS {result['rss_hwm_mib']:.0f} MiB  "
            f"{journal_note(result['journal'])}  log warnings {len(result['log_warnings'])}")


LEGEND = ("errors = non-2xx + socket errors summed over the runs; 2 nodes: req/s summed, p50/p99 the "
          "worse node's; RSS = peak (VmHWM) of the largest kvd node, and of nats-server;\n"
          "rec/commit = records per fsync (file) or per NATS message, median; re-decided = writes "
          "superseded by the other node's and decided again, summed over the runs")
PARAMS = ("duration", "warmup", "repeats", "connections", "threads", "timeout", "keys", "put_percent",
          "server_cpu", "client_cpu", "smoke")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    opts = Options(python=args.python, pin=args.server_pin, work_dir=args.work_dir)
    machine = machine_info(args.python)
    if args.nats_binary:
        version = subprocess.run([args.nats_binary, "--version"], capture_output=True, text=True)
        machine["nats_server"] = (version.stdout or version.stderr).strip()
    started = datetime.datetime.now(datetime.UTC)
    pinning = (f"kvd nodes and nats-server on CPU {args.server_cpu}, wrk on CPU {args.client_cpu}"
               if args.server_pin else "not pinned")
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, "
          f"Linux {machine['kernel']}, {machine['python']}, {machine['wrk']}, "
          f"{machine.get('nats_server', 'no nats-server')}\n"
          f"kvd {machine['kvd_commit']}; load average {machine['loadavg_start'][0]:.2f} at start\n"
          f"{args.repeats} x {args.duration:g}s (+{args.warmup:g}s warm-up), {args.connections} "
          f"connections and {args.threads} wrk threads in all, {args.keys} keys; {pinning}")

    runs: dict[str, dict[str, list[dict]]] = {w: {n: [] for n in args.setups} for w in args.workloads}
    failures: list[str] = []
    cells = [(r, w, n) for r in range(args.repeats) for w in args.workloads for n in args.setups]
    for number, (repeat, workload, name) in enumerate(cells, 1):
        label = f"[{number}/{len(cells)}] repeat {repeat + 1} {workload:<5} {name:<7}"
        try:
            runs[workload][name].append(run_cell(args, opts, name, workload, repeat))
        except Exception as exc:  # report and go on with the other cells
            failures.append(f"{workload} {name} (repeat {repeat + 1}): {exc}")
            print(f"{label} FAILED: {exc}", file=sys.stderr, flush=True)
        else:
            print(label, progress(runs[workload][name][-1]), file=sys.stderr, flush=True)

    medians = {workload: {name: summarize(cell) for name, cell in by_setup.items() if cell}
               for workload, by_setup in runs.items()}
    ratio_rows = ratios(medians)
    machine["loadavg_end"] = os.getloadavg()

    print(f"\nmedian of {args.repeats} x {args.duration:g}s runs; {LEGEND}")
    print(format_table(medians, args.setups))
    print("\nratios of medians:")
    print(format_ratios(ratio_rows) or "  none: they need file-1 with nats-1, or nats-1 with nats-2")
    for workload, by_setup in runs.items():
        for name, cell in by_setup.items():
            for result in cell:
                if result["log_warnings"]:
                    print(f"note: kvd logged {len(result['log_warnings'])} warnings in {workload} "
                          f"{name}; first: {result['log_warnings'][0][:200]}")
    for failure in failures:
        print(f"FAILED: {failure.splitlines()[0]}")

    results = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "params": {**{key: getattr(args, key) for key in PARAMS}, "pinned": bool(args.server_pin),
                   "value_bytes": len(servers.VALUE)},
        "setups": {name: SETUPS[name] for name in args.setups},
        "failures": failures,
        "medians": medians,
        "ratios": ratio_rows,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"\nresults: {args.json}")
    failed_requests = [f"{w} {n}" for w, by in medians.items() for n, cell in by.items()
                       if cell["errors"] or not cell["rps"] > 0]
    if args.smoke and failed_requests:
        print(f"smoke: requests failed in {', '.join(failed_requests)}", file=sys.stderr)
    return 1 if failures or (args.smoke and failed_requests) else 0


if __name__ == "__main__":
    sys.exit(main())
