"""kvd's HTTP benchmark: kvd against framework ceilings, the original design and C peers.

    python bench/run.py [--duration 10] [--repeats 3] [--connections 64] [--threads 2]
                        [--workloads put,get,mixed,list] [--servers kvd,bare-uvloop,...]
    python bench/run.py --smoke      # seconds: 1 s runs, 1 repeat, kvd and bare-uvloop

For every repeat, workload and server it starts the server afresh (loopback,
free port, fresh data directory, pinned to core 0), preloads the 10k keys
(put overwrites them), warms up, drives it with wrk pinned to core 1
(bench/wrk/kv.lua, a random key per request from a per-thread seed), and
reads the server's peak RSS. Repeats go round all cells before the next, so
a noisy minute on the shared machine hits every server alike. It prints a
table of medians with ratios to the bare-uvloop reference and the issue's
targets, and writes bench/results/latest.json and docs/benchmarks.png.
Exit status 1 when a cell could not run (and, with --smoke, when any request
failed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import servers
from servers import BENCH_DIR, KVD_PATH_HELP, REPO_ROOT, Options, Running, StartError, run_order

LUA_SCRIPT = BENCH_DIR / "wrk" / "kv.lua"
WORKLOADS = ("put", "get", "mixed", "list")
REFERENCE = "bare-uvloop"
SMOKE_SERVERS = ("kvd", "bare-uvloop")


@dataclass(frozen=True)
class ServerSpec:
    name: str
    flavor: str  # request dialect in bench/wrk/kv.lua
    preload: str  # strategy in servers.preload
    about: str
    start: Callable[[Path, Options], Running]
    missing: Callable[[Options], str | None] = lambda opts: None


def _flask_missing(opts: Options) -> str | None:
    probe = subprocess.run(
        [opts.python, "-c", "import importlib.metadata as m, flask; print(m.version('pickledb'))"],
        capture_output=True, text=True,
    )
    if probe.returncode != 0:
        return "flask or pickledb not installed in this environment (make bench installs them)"
    if probe.stdout.strip() != "0.9.2":
        return f"pickledb {probe.stdout.strip()} installed, the original design needs 0.9.2"
    return None


SERVERS = {
    spec.name: spec
    for spec in (
        ServerSpec("kvd", "kvd", "bulk", "kvd, fsync=always (the default)",
                   lambda d, o: servers.start_kvd(d, o, fsync="always")),
        ServerSpec("kvd-everysec", "kvd", "bulk", "kvd, fsync=everysec",
                   lambda d, o: servers.start_kvd(d, o, fsync="everysec")),
        ServerSpec("bare-asyncio", "kvd", "single", "bare Tornado dict, asyncio loop, no persistence",
                   lambda d, o: servers.start_bare(d, o, loop="asyncio")),
        ServerSpec("bare-uvloop", "kvd", "single", "bare Tornado dict, uvloop, no persistence",
                   lambda d, o: servers.start_bare(d, o, loop="uvloop")),
        ServerSpec("flask-pickledb", "flask", "bulk",
                   "original design: Flask dev server + pickledb 0.9.2, dump per write",
                   servers.start_flask, _flask_missing),
        ServerSpec("webdis-redis", "webdis", "webdis", "Redis 7 (no persistence) behind webdis",
                   servers.start_webdis,
                   lambda o: servers.binary_missing("redis-server", "webdis")),
        ServerSpec("etcd", "etcd", "etcd", "etcd 3.4 v3 JSON gateway, WAL fsync per commit",
                   servers.start_etcd, lambda o: servers.binary_missing("etcd")),
    )
}


@dataclass(frozen=True)
class Target:
    text: str
    workload: str
    metric: str  # "rps": kvd / other >= goal; "p99": kvd / other <= goal
    other: str
    goal: float
    server: str = "kvd"


TARGETS = (
    Target("GET >= 90% of the uvloop reference", "get", "rps", "bare-uvloop", 0.90),
    Target("GET >= 1.5x etcd GET", "get", "rps", "etcd", 1.5),
    Target("mixed >= 85% of the uvloop reference", "mixed", "rps", "bare-uvloop", 0.85),
    Target("PUT (fsync=always) >= 70% of the uvloop reference", "put", "rps", "bare-uvloop", 0.70),
    Target("PUT (fsync=always) >= 1.0x etcd durable PUT", "put", "rps", "etcd", 1.0),
    Target("list >= 2x the bare (asyncio loop) reference", "list", "rps", "bare-asyncio", 2.0),
    Target("PUT >= 100x the original design", "put", "rps", "flask-pickledb", 100.0),
    Target("GET >= 3x the original design", "get", "rps", "flask-pickledb", 3.0),
    *(
        Target(f"{w} p99 <= 1.5x the uvloop reference's p99", w, "p99", "bare-uvloop", 1.5)
        for w in WORKLOADS
    ),
)


# --- running one cell --------------------------------------------------------------------


def run_wrk(args: argparse.Namespace, url: str, flavor: str, workload: str, duration: float,
            seed: int) -> dict:
    argv = [
        *args.client_pin, "wrk", "-t", str(args.threads), "-c", str(args.connections),
        "-d", f"{duration:g}s", "--timeout", f"{args.timeout:g}s", "-s", str(LUA_SCRIPT), url,
        "--", flavor, workload, str(args.keys), str(args.put_percent), str(seed),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120,
                          preexec_fn=servers.die_with_parent)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            raw = json.loads(line.split(" ", 1)[1])
            break
    else:
        raise RuntimeError(f"wrk printed no result (exit {done.returncode}): {done.stderr.strip()[:300]}")
    seconds = raw["duration_us"] / 1e6
    socket_errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    return {
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "non_2xx": raw["status_errors"],
        "socket_errors": socket_errors,
        "errors": raw["status_errors"] + socket_errors,
        "wrk": raw,
    }


def run_cell(args: argparse.Namespace, opts: Options, spec: ServerSpec, workload: str,
             repeat: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix=f"kvd-bench-{spec.name}-", dir=opts.work_dir))
    running: Running | None = None
    try:
        for attempt in range(3):  # a port handed out by free_port() may be taken meanwhile
            try:
                running = spec.start(data_dir, opts)
                break
            except StartError as exc:
                if attempt == 2:
                    logs = sorted(data_dir.glob("*.log")) + sorted(data_dir.glob("*.out"))
                    tail = Running(spec.name, "", data_dir, logs=logs).log_tail()
                    raise StartError(f"{exc}\n{tail}") from None
        assert running is not None
        # Every workload, put included, runs on a store holding the whole key space, so
        # the numbers do not depend on how far a run got in filling it (the original
        # design's write cost, a rewrite of the whole database, grows with it).
        servers.preload(spec.preload, running.url, args.keys)
        servers.check_answers(spec.flavor, running.url, args.keys)
        if args.warmup > 0:
            run_wrk(args, running.url, spec.flavor, workload, args.warmup, seed=1000 + repeat)
        result = run_wrk(args, running.url, spec.flavor, workload, args.duration, seed=repeat)
        if not running.alive():
            raise RuntimeError(f"server died during the run\n{running.log_tail()}")
        peak, current = running.memory_kib()
        result["rss_hwm_mib"] = peak / 1024
        result["rss_mib"] = current / 1024
        return result
    finally:
        if running is not None:
            running.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


# --- summaries ---------------------------------------------------------------------------


def median_of(runs: list[dict]) -> dict:
    keys = ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "rss_hwm_mib", "rss_mib")
    summary = {key: statistics.median(run[key] for run in runs) for key in keys}
    summary["errors"] = sum(run["errors"] for run in runs)
    summary["non_2xx"] = sum(run["non_2xx"] for run in runs)
    summary["socket_errors"] = sum(run["socket_errors"] for run in runs)
    summary["repeats"] = len(runs)
    return summary


def evaluate(target: Target, medians: dict[str, dict[str, dict]]) -> dict:
    mine = medians.get(target.workload, {}).get(target.server)
    other = medians.get(target.workload, {}).get(target.other)
    row = {"target": f"kvd {target.text}", "workload": target.workload, "metric": target.metric,
           "against": target.other, "goal": target.goal}
    if not mine or not other:
        missing = target.server if not mine else target.other
        return {**row, "ratio": None, "met": None, "note": f"not measured: {missing} did not run"}
    if target.metric == "rps":
        ratio = mine["rps"] / other["rps"] if other["rps"] else float("inf")
        met = ratio >= target.goal
        note = "met" if met else f"missed by {100 * (1 - ratio / target.goal):.1f}%"
    else:
        ratio = mine["p99_ms"] / other["p99_ms"] if other["p99_ms"] else float("inf")
        met = ratio <= target.goal
        note = "met" if met else f"missed: {ratio / target.goal:.2f}x over the limit"
    return {**row, "ratio": ratio, "met": met, "note": note}


def format_table(medians: dict[str, dict[str, dict]], order: list[str]) -> str:
    header = (f"{'workload':<8} {'server':<15} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>7} {'RSS MiB':>8} {'x ' + REFERENCE:>14}")
    lines = [header, "-" * len(header)]
    for workload, by_server in medians.items():
        reference = by_server.get(REFERENCE)
        for name in order:
            cell = by_server.get(name)
            if cell is None:
                continue
            ratio = f"{cell['rps'] / reference['rps']:.2f}" if reference and reference["rps"] else "-"
            lines.append(
                f"{workload:<8} {name:<15} {cell['rps']:>9.0f} {cell['p50_ms']:>8.2f} "
                f"{cell['p99_ms']:>8.2f} {cell['errors']:>7d} {cell['rss_hwm_mib']:>8.1f} {ratio:>14}"
            )
    return "\n".join(lines)


def format_targets(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row["ratio"] is None:
            lines.append(f"  n/a     {row['target']}: {row['note']}")
            continue
        sign = ">=" if row["metric"] == "rps" else "<="
        state = "MET   " if row["met"] else "MISSED"
        lines.append(f"  {state}  {row['target']}: {row['ratio']:.2f} (goal {sign} {row['goal']:g}); {row['note']}")
    return "\n".join(lines)


def plot(medians: dict[str, dict[str, dict]], order: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(medians)
    names = [name for name in order if any(name in medians[w] for w in workloads)]
    colours = {name: plt.get_cmap("tab10")(index) for index, name in enumerate(SERVERS)}
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for index, name in enumerate(names):
        xs, ys = [], []
        for position, workload in enumerate(workloads):
            if name in medians[workload]:
                xs.append(position - 0.4 + width * (index + 0.5))
                ys.append(medians[workload][name]["rps"])
        bars = ax.bar(xs, ys, width, label=name, color=colours.get(name))
        for bar, value in zip(bars, ys, strict=True):
            ax.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=6, rotation=90, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_yscale("log")
    top = max((c["rps"] for by in medians.values() for c in by.values()), default=1.0)
    ax.set_ylim(top=top * 4)  # room for the value labels above the tallest bar
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("requests/s (median, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the machine -------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def machine_info(python: str, kvd_path: Path = REPO_ROOT) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        memory_kib = 0
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": _first_line([python, "--version"]),
        "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
        "redis": _first_line(["redis-server", "--version"]) if shutil.which("redis-server") else None,
        "etcd": _first_line(["etcd", "--version"]) if shutil.which("etcd") else None,
        "kvd_commit": _first_line(["git", "-C", str(kvd_path), "describe", "--always", "--dirty"]),
        "loadavg_start": os.getloadavg(),
    }


# --- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true",
                        help="a run of seconds: 1 s, 1 repeat, no warm-up, 1000 keys, kvd and bare-uvloop")
    parser.add_argument("--duration", type=float, help="seconds per measured run (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load first (default 1)")
    parser.add_argument("--repeats", type=int, help="runs per cell; the median is reported (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="wrk request timeout, seconds")
    parser.add_argument("--workloads", help=f"comma-separated, of {','.join(WORKLOADS)} (default all)")
    parser.add_argument("--servers", help=f"comma-separated, of {','.join(SERVERS)} (default all)")
    parser.add_argument("--keys", type=int,
                        help="key space k0..k(N-1) (default 10000; smoke: 1000)")
    parser.add_argument("--put-percent", type=int, default=10, help="writes in mixed (default 10)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for kvd and the Python servers (default: this one)")
    parser.add_argument("--kvd-path", type=Path, default=REPO_ROOT, help=KVD_PATH_HELP)
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list for servers (default 0)")
    parser.add_argument("--client-cpu", default="1", help="taskset CPU list for wrk (default 1)")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/latest.json; "
                        "smoke: bench/results/smoke.json)")
    parser.add_argument("--plot", help="PNG plot, or 'none' (default docs/benchmarks.png; smoke: none)")
    parser.add_argument("--work-dir", type=Path, help="where fresh data directories go (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep data directories and logs")
    args = parser.parse_args(argv)

    smoke = args.smoke
    args.duration = args.duration if args.duration is not None else (1.0 if smoke else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.0 if smoke else 1.0)
    args.repeats = args.repeats if args.repeats is not None else (1 if smoke else 3)
    args.keys = args.keys if args.keys is not None else (1000 if smoke else 10_000)
    args.workloads = _names(args.workloads, WORKLOADS, parser, "workload") if args.workloads else list(WORKLOADS)
    default_servers = list(SMOKE_SERVERS) if smoke else list(SERVERS)
    args.servers = _names(args.servers, SERVERS, parser, "server") if args.servers else default_servers
    if args.json is None:
        args.json = BENCH_DIR / "results" / ("smoke.json" if smoke else "latest.json")
    if args.plot is None:
        args.plot = "none" if smoke else str(REPO_ROOT / "docs" / "benchmarks.png")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads (wrk needs one per thread)")
    if args.duration <= 0 or args.repeats < 1 or args.keys < 10:
        parser.error("--duration must be positive, --repeats at least 1, --keys at least 10")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    args.server_pin = ("taskset", "-c", args.server_cpu) if pin else ()
    args.client_pin = ("taskset", "-c", args.client_cpu) if pin else ()
    return args


def _names(raw: str, known, parser: argparse.ArgumentParser, what: str) -> list[str]:  # noqa: ANN001
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # the header before the progress lines on stderr
    opts = Options(python=args.python, pin=args.server_pin, work_dir=args.work_dir,
                   kvd_path=args.kvd_path.resolve())
    machine = machine_info(args.python, opts.kvd_path)
    started = datetime.datetime.now(datetime.UTC)
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, "
          f"Linux {machine['kernel']}, {machine['python']}, {machine['wrk']}")
    print(f"kvd {machine['kvd_commit']}; load average {machine['loadavg_start'][0]:.2f} at start")
    print(f"runs: {args.duration:g}s (+{args.warmup:g}s warm-up) x {args.repeats} repeats, "
          f"{args.connections} connections, {args.threads} wrk threads, {args.keys} keys; "
          + (f"servers on CPU {args.server_cpu}, wrk on CPU {args.client_cpu}" if args.server_pin
             else "not pinned"))

    skipped: dict[str, str] = {}
    names = []
    for name in args.servers:
        reason = SERVERS[name].missing(opts)
        if reason:
            skipped[name] = reason
            print(f"note: skipping {name}: {reason}")
        else:
            names.append(name)

    runs: dict[str, dict[str, list[dict]]] = {w: {n: [] for n in names} for w in args.workloads}
    failures: list[str] = []
    total = args.repeats * len(args.workloads) * len(names)
    done = 0
    for repeat in range(args.repeats):
        for workload in args.workloads:
            for name in run_order(names, repeat, args.repeats):
                done += 1
                prefix = f"[{done}/{total}] repeat {repeat + 1} {workload:<5} {name:<15}"
                try:
                    result = run_cell(args, opts, SERVERS[name], workload, repeat)
                except Exception as exc:  # report and go on: one broken peer must not stop the run
                    failures.append(f"{workload} {name} (repeat {repeat + 1}): {exc}")
                    print(f"{prefix} FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                runs[workload][name].append(result)
                print(f"{prefix} {result['rps']:9.0f} req/s  p50 {result['p50_ms']:7.2f} ms  "
                      f"p99 {result['p99_ms']:7.2f} ms  errors {result['errors']}  "
                      f"RSS {result['rss_hwm_mib']:.0f} MiB", file=sys.stderr, flush=True)

    medians = {
        workload: {name: median_of(cell) for name, cell in by_server.items() if cell}
        for workload, by_server in runs.items()
    }
    # Targets against a server this run was not asked for are left out (a smoke run's
    # etcd target, say); a requested server that was skipped or failed shows as n/a.
    evaluations = [
        evaluate(t, medians)
        for t in TARGETS
        if t.workload in args.workloads and {t.server, t.other} <= set(args.servers)
    ]
    machine["loadavg_end"] = os.getloadavg()
    finished = datetime.datetime.now(datetime.UTC)

    print()
    print(f"median of {args.repeats} x {args.duration:g}s runs; errors = non-2xx + socket errors "
          f"summed over the runs; RSS = peak (VmHWM) of the server's processes")
    print(format_table(medians, names))
    print()
    print("targets (kvd = fsync=always):")
    print(format_targets(evaluations))
    for name, reason in skipped.items():
        print(f"note: {name} skipped: {reason}")
    for failure in failures:
        print(f"FAILED: {failure.splitlines()[0]}")

    results = {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "machine": machine,
        "params": {
            "duration_s": args.duration, "warmup_s": args.warmup, "repeats": args.repeats,
            "connections": args.connections, "threads": args.threads, "keys": args.keys,
            "put_percent": args.put_percent, "value_bytes": len(servers.VALUE),
            "server_pin": " ".join(args.server_pin) or None,
            "client_pin": " ".join(args.client_pin) or None, "smoke": args.smoke,
        },
        "servers": {name: SERVERS[name].about for name in names},
        "skipped": skipped,
        "failures": failures,
        "medians": medians,
        "runs": runs,
        "targets": evaluations,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"\nresults: {args.json}")
    if args.plot != "none" and any(medians.values()):
        title = (f"kvd benchmark: median of {args.repeats} x {args.duration:g}s, "
                 f"{args.connections} connections, {machine['nproc']} CPUs ({machine['cpu']}), "
                 f"{started:%Y-%m-%d}")
        plot(medians, names, Path(args.plot), title)
        print(f"plot: {args.plot}")

    if failures:
        return 1
    if args.smoke:
        bad = [f"{w} {n}" for w, by in medians.items() for n, m in by.items()
               if m["errors"] or m["rps"] <= 0]
        if bad:
            print(f"smoke: requests failed in {', '.join(bad)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
