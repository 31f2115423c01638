"""Render bench results as Markdown tables for docs/benchmarks.md, and redraw the plot.

    python bench/report.py [RESULTS.json ...] [--plot docs/benchmarks.png]

Without files it reads bench/results/latest.json and bench/results/replay.json.
``--plot`` redraws the throughput plot from the first HTTP results file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from replay import journal_label
from servers import BENCH_DIR


def http_tables(results: dict) -> str:
    machine, params = results["machine"], results["params"]
    lines = [
        f"Run {results['started']} on kvd `{machine['kvd_commit']}`: median of {params['repeats']} x "
        f"{params['duration_s']:g} s runs (after {params['warmup_s']:g} s warm-up), "
        f"{params['connections']} connections, {params['threads']} wrk threads, "
        f"{params['keys']} keys, {params['value_bytes']}-byte values; load average "
        f"{machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at the end.",
        "",
        "| workload | server | req/s | p50 ms | p99 ms | errors | peak RSS MiB | x bare-uvloop |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for workload, by_server in results["medians"].items():
        reference = by_server.get("bare-uvloop")
        for name, cell in by_server.items():
            ratio = f"{cell['rps'] / reference['rps']:.2f}" if reference else "-"
            name_md = f"**{name}**" if name == "kvd" else name
            lines.append(
                f"| {workload} | {name_md} | {cell['rps']:,.0f} | {cell['p50_ms']:.1f} | "
                f"{cell['p99_ms']:.1f} | {cell['errors']} | {cell['rss_hwm_mib']:.0f} | {ratio} |"
            )
    lines += ["", "| target (kvd = fsync=always) | measured | goal | verdict |", "|---|--:|--:|---|"]
    for row in results["targets"]:
        if row["ratio"] is None:
            lines.append(f"| {row['target']} | - | - | {row['note']} |")
            continue
        sign = ">=" if row["metric"] == "rps" else "<="
        verdict = "met" if row["met"] else f"**{row['note']}**"
        lines.append(f"| {row['target']} | {row['ratio']:.2f} | {sign} {row['goal']:g} | {verdict} |")
    return "\n".join(lines)


def replay_tables(results: dict) -> str:
    empty = results["empty_store"]
    lines = [
        f"Run {results['started']} on kvd `{results['machine']['kvd_commit']}`: median of "
        f"{results['params']['repeats']} starts; an empty store is ready in "
        f"{empty['ready_s']:.2f} s with a peak RSS of {empty['rss_hwm_mib']:.0f} MiB.",
        "",
        "| start from | keys | CPUs | files MB | live data MB | start to ready s | replay took s "
        "| peak RSS MiB | RSS / live data | (RSS - empty) / live data | RSS once ready / live data "
        "| helper's peak RSS MiB | replay / naive replay |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for v in results["variants"]:
        starts = [(journal_label(v), v["journal_bytes"], v)]
        if "snapshot" in v:
            starts.append((f"snapshot of them{', sealed' if v['snapshot'].get('sealed') else ''}", v["snapshot"]["bytes"], v["snapshot"]))
        for label, size, start in starts:
            by_cpus = start.get("by_cpus") or {"-": {"median": start["median"]}}
            for cpus, result in by_cpus.items():
                m = result["median"]
                rss = m["rss_hwm_mib"]
                live_mib = v["live_bytes"] / 2**20
                helper = f"{m['helper_rss_mib']:.0f}" if m.get("helper_rss_mib") else "-"
                lines.append(
                    f"| {label} | {v['keys']:,} | {cpus} | {size / 1e6:.0f} | {v['live_bytes'] / 1e6:.1f} | "
                    f"{m['ready_s']:.2f} | {m.get('replay_s', float('nan')):.2f} | {rss:.0f} | "
                    f"{rss / live_mib:.2f} | {(rss - empty['rss_hwm_mib']) / live_mib:.2f} | "
                    f"{m['rss_mib'] / live_mib:.2f} | {helper} | {naive_ratio(result)} |"
                )
    lines += ["", "| start | target | measured | verdict |", "|---|---|--:|---|"]
    for row in results["targets"]:
        verdict = "met" if row["met"] else f"**{row['note']}**"
        lines.append(f"| {row['journal']} | {row['target']} | {row['value']:.2f} | {verdict} |")
    return "\n".join(lines)


def naive_ratio(result: dict) -> str:
    """kvd's replay over bench/naive_replay.py's, where the run measured one."""
    ratio = (result.get("ratios") or {}).get("replay_over_naive")
    return f"{ratio:.2f}" if ratio else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path)
    parser.add_argument("--plot", type=Path, help="redraw the throughput plot to this PNG")
    args = parser.parse_args()
    paths = args.results or [
        BENCH_DIR / "results" / "latest.json", BENCH_DIR / "results" / "replay.json"
    ]
    plotted = False
    for path in paths:
        if not path.exists():
            print(f"({path} not found)\n")
            continue
        results = json.loads(path.read_text())
        if "variants" in results:
            print(replay_tables(results))
        else:
            print(http_tables(results))
            if args.plot and not plotted:
                redraw(results, args.plot)
                plotted = True
        print()
    return 0


def redraw(results: dict, path: Path) -> None:
    from run import plot

    machine, params = results["machine"], results["params"]
    names = list(results["servers"])
    title = (f"kvd benchmark: median of {params['repeats']} x {params['duration_s']:g}s, "
             f"{params['connections']} connections, {machine['nproc']} CPUs ({machine['cpu']}), "
             f"{results['started'][:10]}")
    plot(results["medians"], names, path, title)


if __name__ == "__main__":
    sys.exit(main())
