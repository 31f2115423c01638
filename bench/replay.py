"""Start-up cost of a large journal: replay time and memory of ``kvd serve`` against the live data.

    python bench/replay.py [--records 1000000] [--keys 100000,1000000] [--repeats 3]

For each key count it writes a journal of RECORDS put records with
bench/make_journal.py (one key per record, ~100-byte values, keys cycling
over KEYS names, first written in a random order unless --key-order sorted;
KEYS = RECORDS makes every record a distinct key) in segments of
--segment-bytes (16 MiB, the server's default) and seals every finished
segment as the server's sealer does (kvd/log/seal.py; --seals unsealed
measures the same journal without seals, as after an upgrade, and both
measures each), then
REPEATS times copies it to a fresh data directory, starts
``kvd serve --port 0`` on it, pinned to each CPU set of --cpus in turn (by
default both cores, where a helper process checks the journal's later part
(kvd/log/scan_ahead.py), then core 0 alone), and measures:

- ready: seconds from starting the process to its ``ready`` log line (read
  every 20 ms; kvd logs it as /readyz turns 200, which is then checked once),
  interpreter start-up and imports included;
- replay: the ``replay took`` figure kvd logs;
- peak RSS (VmHWM) once ready, the resident set then (VmRSS, column
  "ready", over the live data), and the helper's own peak RSS as kvd logs it;
- before each round of starts, bench/naive_replay.py on the same journal,
  pinned to one core: the plainest Python replay (orjson per line into a
  dict, nothing checked). Column "x naive" is kvd's replay over its median,
  a figure that can be compared across machines, where seconds cannot;

Then it compacts a copy of the journal (as ``kvd journal compact`` does: a
snapshot of the live state, no records after it) and measures a start from
that snapshot the same way (skip with --no-snapshot).

All against the raw live data: the sum, over live keys, of the key's UTF-8 bytes
and the value's compact JSON bytes. The journal was just written, so it is
read from the page cache. Prints medians and the ratios to the targets
(replay of 1M records <= 3 s; RSS <= 2.5x the raw live data) and writes
bench/results/replay.json.
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
import time
from dataclasses import replace
from pathlib import Path

import orjson
import servers
from make_journal import make_journal
from naive_replay import naive_replay
from run import machine_info
from servers import BENCH_DIR, HOST, KVD_PATH_HELP, REPO_ROOT, Options, call

from kvd.config import JournalConfig
from kvd.log.seal import write_snapshot_seal

REPLAY_TOOK = re.compile(rb"replay took ([0-9.]+)s")
READY_POLL_S = 0.02
HELPER_RSS = re.compile(rb"helper process checked [0-9]+ chunks .*peak RSS ([0-9]+) MiB")
FROM_SEALS = re.compile(rb"replay: ([0-9]+) finished segments read from their seals")
SNAPSHOT_FROM_SEAL = re.compile(rb"replay: snapshot-[0-9]+\.jsonl loaded from its seal")
UNPINNED = "any"
REPLAY_TARGET_S = 3.0  # per million records
RSS_TARGET_RATIO = 2.5


def live_bytes(directory: Path) -> tuple[int, int]:
    """(live keys, raw live bytes) after replaying the journal's records naively."""
    state = naive_replay(directory)
    return len(state), sum(len(key.encode()) + len(orjson.dumps(value)) for key, value in state.items())


def start_and_measure(data_dir: Path, opts: Options, timeout: float) -> dict:
    """Start kvd on ``data_dir/store``; time it to ready, read its memory, stop it."""
    log = data_dir / "kvd.log"
    env = servers.kvd_env(opts)
    argv = [opts.python, "-m", "kvd", "serve", "--port", "0", "--data-dir", str(data_dir / "store"),
            "--log-level", "info"]
    started = time.monotonic()
    proc = servers.spawn(argv, log, opts, cwd=data_dir, env=env)
    running = servers.Running("kvd", "", data_dir, [proc], [log])
    try:
        port = servers.wait_for_port_line(proc, log, timeout)
        listening = time.monotonic() - started
        running.url = f"http://{HOST}:{port}"
        deadline = started + timeout
        # Watch the log, not /readyz: a request every few ms takes the GIL from the
        # replay thread (polling every 5 ms slowed replay by 10-20%). kvd logs its
        # ready line as /readyz turns 200; one request then confirms it.
        while REPLAY_TOOK.search(log.read_bytes()) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kvd did not get ready\n{running.log_tail()}")
            time.sleep(READY_POLL_S)
        ready = time.monotonic() - started
        if call(running.url, "GET", "/readyz", timeout=5)[0] != 200:
            raise RuntimeError(f"kvd logged ready but /readyz is not 200\n{running.log_tail()}")
        hwm, rss = running.memory_kib()
        logged = log.read_bytes()
        found = REPLAY_TOOK.search(logged)
        helper = HELPER_RSS.search(logged)
        sealed = FROM_SEALS.search(logged)
        return {
            "from_seals": int(sealed.group(1)) if sealed else 0,
            "snapshot_from_seal": SNAPSHOT_FROM_SEAL.search(logged) is not None,
            "listening_s": listening,
            "ready_s": ready,
            "replay_s": float(found.group(1)) if found else None,
            "helper_rss_mib": float(helper.group(1)) if helper else None,
            "rss_hwm_mib": hwm / 1024,
            "rss_mib": rss / 1024,
        }
    finally:
        running.stop()


def naive_seconds(directory: Path, opts: Options, pin: tuple[str, ...]) -> float:
    """Seconds bench/naive_replay.py takes on ``directory``, pinned like a one-core kvd."""
    out = subprocess.run(
        [*pin, opts.python, str(BENCH_DIR / "naive_replay.py"), str(directory)],
        capture_output=True, text=True, check=True,
    ).stdout
    return float(out.split()[0])


def target_row(label: str, what: str, value: float, goal: float) -> dict:
    met = value <= goal
    note = "met" if met else f"missed: {value / goal:.2f}x the limit"
    return {"journal": label, "target": f"{what} <= {goal:g}", "value": value, "met": met, "note": note}


def compact_copy(pristine: Path, target: Path) -> float:
    """Copy the journal and compact it as ``kvd journal compact`` would; returns the seconds taken."""
    from kvd.log.compaction import compact_stopped
    from kvd.log.file import FileJournal
    from kvd.store import Store

    shutil.copytree(pristine, target)
    store = Store()
    journal = FileJournal(target, on_commit=store.apply, on_restore=store.restore)
    journal.replay()
    store.finish_replay()
    report = compact_stopped(journal, store)
    journal.close_sync()
    return report.seconds


def start_runs(args: argparse.Namespace, opts: Options, source: Path, work: Path, label: str,
               *, yardstick: bool = False) -> dict:
    """REPEATS starts of kvd on fresh copies of ``source`` for each CPU set in ``args.cpu_sets``,
    alternating; {cpus: {"runs", "median"}}. With ``yardstick``, bench/naive_replay.py runs
    on ``source`` before each round, on one core of the last CPU set."""
    results: dict = {cpus: {"runs": []} for cpus in args.cpu_sets}
    naive: list[float] = []
    one_core = args.cpu_sets[-1].split("-")[0].split(",")[0]
    naive_pin = ("taskset", "-c", one_core) if args.cpu_sets[-1] != UNPINNED else ()
    for repeat in range(args.repeats):
        if yardstick:
            naive.append(naive_seconds(source, opts, naive_pin))
            print(f"  naive replay, repeat {repeat + 1}: {naive[-1]:.2f}s", file=sys.stderr, flush=True)
        for cpus in args.cpu_sets:
            run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
            shutil.copytree(source, run_dir / "store")
            pinned = replace(opts, pin=("taskset", "-c", cpus) if cpus != UNPINNED else ())
            result = start_and_measure(run_dir, pinned, args.timeout)
            shutil.rmtree(run_dir, ignore_errors=True)
            results[cpus]["runs"].append(result)
            helper = result["helper_rss_mib"]
            print(f"  {label} on CPUs {cpus}, repeat {repeat + 1}: ready {result['ready_s']:.2f}s, "
                  f"replay {result['replay_s']}s, RSS {result['rss_hwm_mib']:.0f} MiB"
                  + (f" (helper {helper:.0f} MiB)" if helper else ""), file=sys.stderr, flush=True)
    for result in results.values():
        runs = result["runs"]
        result["median"] = {
            key: statistics.median(run[key] for run in runs if run[key] is not None)
            for key in ("listening_s", "ready_s", "replay_s", "rss_hwm_mib", "rss_mib", "helper_rss_mib")
            if any(run[key] is not None for run in runs)
        }
        if naive:
            result["naive_s"] = statistics.median(naive)
    return results


def measure_variants(args: argparse.Namespace, opts: Options, keys: int, work: Path) -> list[dict]:
    """One journal over ``keys`` keys, and its compacted copy, started from as each of
    ``args.seal_modes`` says: with the seals a server leaves, or without."""
    pristine = work / f"journal-{keys}"
    print(f"writing {args.records} records over {keys} keys ...", file=sys.stderr, flush=True)
    written_at = time.monotonic()
    size = make_journal(pristine, args.records, keys, shuffled=args.key_order == "random",
                        segment_bytes=args.segment_bytes or None, seal="sealed" in args.seal_modes)
    made = time.monotonic() - written_at
    live_keys, raw = live_bytes(pristine)
    compacted = work / f"snapshot-{keys}"
    compact_seconds = None if args.no_snapshot else compact_copy(pristine, compacted)
    variants = []
    for mode in args.seal_modes:
        if mode == "unsealed":
            for seal in [*pristine.glob("*.seal"), *compacted.glob("*.seal")]:
                seal.unlink()
        seals = len(list(pristine.glob("*.seal")))
        by_cpus = start_runs(args, opts, pristine, work, f"journal ({mode})", yardstick=True)
        first = by_cpus[args.cpu_sets[0]]
        variant = {
            "records": args.records, "keys": keys, "journal_bytes": size, "journal_write_s": made,
            "segments": len(list(pristine.glob("[0-9]*.jsonl"))), "seals": seals,
            "live_keys": live_keys, "live_bytes": raw, "median": first["median"], "runs": first["runs"],
            "by_cpus": by_cpus,
        }
        if compact_seconds is not None:
            [snapshot] = compacted.glob("snapshot-*.jsonl")
            if mode == "sealed":
                write_snapshot_seal(snapshot)  # as the server's sealer does after a compaction
            by_cpus = start_runs(args, opts, compacted, work, f"snapshot ({mode})")
            first = by_cpus[args.cpu_sets[0]]
            variant["snapshot"] = {
                "compact_s": compact_seconds, "bytes": snapshot.stat().st_size, "sealed": mode == "sealed",
                "median": first["median"], "runs": first["runs"], "by_cpus": by_cpus,
            }
        variants.append(variant)
    shutil.rmtree(compacted, ignore_errors=True)
    shutil.rmtree(pristine, ignore_errors=True)
    return variants


def journal_label(variant: dict) -> str:
    """How tables name a journal start: its records, and its seals."""
    sealed = f", {variant['seals']} of {variant['segments']} segments sealed" if variant.get("seals") else ""
    return f"{variant['records']} records{sealed}"


def empty_baseline(opts: Options, work: Path, timeout: float) -> dict:
    """The same measurement on an empty store: the interpreter's and libraries' share."""
    run_dir = Path(tempfile.mkdtemp(prefix="empty-", dir=work))
    try:
        return start_and_measure(run_dir, opts, timeout)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000, help="records per journal")
    parser.add_argument("--keys", default="100000,1000000",
                        help="comma-separated distinct-key counts, one journal each "
                             "(default 100000,1000000)")
    parser.add_argument("--repeats", type=int, default=3, help="starts per journal (median)")
    parser.add_argument("--key-order", choices=("random", "sorted"), default="random",
                        help="the order keys are first written in (default random, as real keys "
                             "come; sorted makes start-up's index build almost free)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for ready")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--kvd-path", type=Path, default=REPO_ROOT, help=KVD_PATH_HELP)
    parser.add_argument("--cpus", default="0-1/0",
                        help="CPU sets to pin kvd to, separated by '/', measured alternately "
                             "(default 0-1/0: both cores, where a helper process checks the "
                             "journal's later part, then core 0, where kvd replays alone)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin kvd (one unpinned set)")
    parser.add_argument("--work-dir", type=Path, help="where journals go (default: temp)")
    parser.add_argument("--segment-bytes", type=int, default=JournalConfig.segment_bytes,
                        help="journal segment size, as the server's journal.segment_bytes "
                             f"(default {JournalConfig.segment_bytes >> 20} MiB, the server's; 0: one segment)")
    parser.add_argument("--seals", choices=("sealed", "unsealed", "both"), default="sealed",
                        help="start from the journal with its finished segments sealed, as a "
                             "server leaves them (default), without seals, or both")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="skip the start from a compacted copy (snapshot + empty tail)")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "replay.json")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    key_counts = [int(part) for part in args.keys.split(",") if part.strip()]
    args.seal_modes = ["sealed", "unsealed"] if args.seals == "both" else [args.seals]
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    args.cpu_sets = args.cpus.split("/") if pin else [UNPINNED]
    opts = Options(python=args.python, pin=("taskset", "-c", args.cpu_sets[0]) if pin else (),
                   kvd_path=args.kvd_path.resolve())

    machine = machine_info(args.python, opts.kvd_path)
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, "
          f"Linux {machine['kernel']}, {machine['python']}; kvd {machine['kvd_commit']}; "
          f"load average {machine['loadavg_start'][0]:.2f}")
    started = datetime.datetime.now(datetime.UTC)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvd-replay-", dir=args.work_dir))
    try:
        baseline = empty_baseline(opts, work, args.timeout)
        variants = [variant for keys in key_counts for variant in measure_variants(args, opts, keys, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_million = 1_000_000 / args.records
    print()
    print(f"median of {args.repeats} starts; empty store: ready {baseline['ready_s']:.2f}s, "
          f"RSS {baseline['rss_hwm_mib']:.1f} MiB")
    header = (f"{'records':>9} {'keys':>9} {'CPUs':>5} {'journal MB':>10} {'live MB':>8} {'ready s':>8} "
              f"{'replay s':>8} {'s per 1M':>8} {'x naive':>7} {'RSS MiB':>8} {'RSS/live':>8} {'(-empty)':>8} {'ready':>6} {'helper':>7}")
    print(header)
    print("-" * len(header))
    targets = []
    for variant in variants:
        live_mib = variant["live_bytes"] / 2**20
        for cpus, result in variant["by_cpus"].items():
            m = result["median"]
            replay = m.get("replay_s", m["ready_s"])
            ratio = m["rss_hwm_mib"] / live_mib
            above_empty = (m["rss_hwm_mib"] - baseline["rss_hwm_mib"]) / live_mib
            naive = replay / result["naive_s"] if result.get("naive_s") else None
            result["ratios"] = {"replay_s_per_million": replay * per_million, "replay_over_naive": naive,
                                "ready_s_per_million": m["ready_s"] * per_million,
                                "rss_over_live": ratio, "rss_above_empty_over_live": above_empty}
            helper = f"{m['helper_rss_mib']:.0f} MiB" if m.get("helper_rss_mib") else "-"
            print(f"{variant['records']:>9} {variant['keys']:>9} {cpus:>5} {variant['journal_bytes'] / 1e6:>10.1f} "
                  f"{variant['live_bytes'] / 1e6:>8.1f} {m['ready_s']:>8.2f} {replay:>8.2f} "
                  f"{replay * per_million:>8.2f} {f'{naive:.2f}' if naive else '-':>7} "
                  f"{m['rss_hwm_mib']:>8.1f} {ratio:>8.2f} {above_empty:>8.2f} "
                  f"{m['rss_mib'] / live_mib:>6.2f} {helper:>7}")
            label = f"{journal_label(variant)}, {variant['keys']} keys, CPUs {cpus}"
            for what, value, goal in (
                ("replay (kvd's 'replay took') per 1M records", replay * per_million, REPLAY_TARGET_S),
                ("start to /readyz 200 per 1M records", m["ready_s"] * per_million, REPLAY_TARGET_S),
                ("peak RSS / raw live data", ratio, RSS_TARGET_RATIO),
            ):
                targets.append(target_row(label, what, value, goal))
        variant["ratios"] = variant["by_cpus"][args.cpu_sets[0]]["ratios"]
        snapshot = variant.get("snapshot")
        if snapshot is None:
            continue
        for cpus, result in snapshot["by_cpus"].items():
            sm = result["median"]
            s_replay = sm.get("replay_s", sm["ready_s"])
            s_ratio = sm["rss_hwm_mib"] / live_mib
            print(f"{'snapshot':>9} {variant['keys']:>9} {cpus:>5} {snapshot['bytes'] / 1e6:>10.1f} "
                  f"{variant['live_bytes'] / 1e6:>8.1f} {sm['ready_s']:>8.2f} {s_replay:>8.2f} "
                  f"{s_replay * 1_000_000 / variant['keys']:>8.2f} {'-':>7} {sm['rss_hwm_mib']:>8.1f} {s_ratio:>8.2f} "
                  f"{(sm['rss_hwm_mib'] - baseline['rss_hwm_mib']) / live_mib:>8.2f} "
                  f"{sm['rss_mib'] / live_mib:>6.2f} {'-':>7}")
            result["ratios"] = {"load_s_per_million_keys": s_replay * 1_000_000 / variant["keys"],
                                "rss_over_live": s_ratio}
            label = f"snapshot{' (sealed)' if snapshot['sealed'] else ''} of {variant['keys']} keys, CPUs {cpus}"
            targets.append(target_row(label, "load (kvd's 'replay took') per 1M keys",
                                      result["ratios"]["load_s_per_million_keys"], REPLAY_TARGET_S))
            targets.append(target_row(label, "peak RSS / raw live data",
                                      result["ratios"]["rss_over_live"], RSS_TARGET_RATIO))
        snapshot["ratios"] = snapshot["by_cpus"][args.cpu_sets[0]]["ratios"]
    print()
    print("targets:")
    for row in targets:
        state = "MET   " if row["met"] else "MISSED"
        print(f"  {state}  {row['journal']}: {row['target']}: {row['value']:.2f}; {row['note']}")

    machine["loadavg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"),
        "machine": machine,
        "params": {"records": args.records, "keys": key_counts, "repeats": args.repeats,
                   "key_order": args.key_order, "segment_bytes": args.segment_bytes,
                   "seals": args.seal_modes,
                   "cpu_sets": args.cpu_sets},
        "empty_store": baseline,
        "variants": variants,
        "targets": targets,
    }, indent=1) + "\n")
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
