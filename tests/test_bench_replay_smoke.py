"""bench/replay.py's short version: every figure printed and written, for each CPU set.

Figures are not asserted (machines are noisy); ``make bench-replay`` reports them.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, run_bench


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_bench_replay_smoke_measures_both_cpu_sets(tmp_path):
    committed = REPO / "bench" / "results" / "replay.json"
    committed_before = committed.read_bytes() if committed.exists() else None
    results = tmp_path / "replay.json"
    run = run_bench(
        "replay.py", "--records", "20000", "--keys", "5000", "--repeats", "1",
        "--cpus", "0-1/0", "--segment-bytes", str(1 << 20), "--seals", "both", "--json", str(results),
    )
    assert "targets:" in run.stdout and "CPUs 0-1" in run.stdout and "CPUs 0:" in run.stdout
    data = json.loads(results.read_text())
    assert data["params"]["cpu_sets"] == ["0-1", "0"]
    variant, unsealed = data["variants"]  # the same journal: with seals, then without
    assert variant["segments"] == unsealed["segments"] == 7 and (variant["seals"], unsealed["seals"]) == (6, 0)
    assert "6 of 7 segments sealed" in run.stdout
    for result in variant["by_cpus"].values():  # start-up read every finished segment from its seal
        assert [start["from_seals"] for start in result["runs"]] == [6]
    for result in unsealed["by_cpus"].values():
        assert [start["from_seals"] for start in result["runs"]] == [0]
    assert variant["live_keys"] == 5000
    assert variant["snapshot"]["sealed"] and not unsealed["snapshot"]["sealed"]
    for sealed, where in ((True, variant["snapshot"]), (False, unsealed["snapshot"])):
        for result in where["by_cpus"].values():
            assert [start["snapshot_from_seal"] for start in result["runs"]] == [sealed]
    for where in (variant, variant["snapshot"], unsealed, unsealed["snapshot"]):
        assert set(where["by_cpus"]) == {"0-1", "0"}
        for result in where["by_cpus"].values():
            [only] = result["runs"]
            assert only["ready_s"] > 0 and only["replay_s"] is not None and only["rss_hwm_mib"] > 0
            assert only["helper_rss_mib"] is None  # 7 MB: far below the helper's threshold
    for result in variant["by_cpus"].values():  # the same-run yardstick, and kvd against it
        assert result["naive_s"] > 0 and result["ratios"]["replay_over_naive"] > 0
    assert "x naive" in run.stdout
    assert len(data["targets"]) == 2 * (2 * 3 + 2 * 2)  # with seals and without
    after = committed.read_bytes() if committed.exists() else None
    assert after == committed_before


def test_replay_phases_smoke_prints_every_phase(tmp_path):
    """bench/replay_phases.py on a small journal: kvd's phases and the whole-file digests
    always; the C and msgspec rows only where a compiler with OpenSSL's headers, or
    msgspec, is installed (optional there)."""
    run = run_bench("replay_phases.py", "--records", "3000", "--repeats", "1", timeout=120)
    assert run.stdout.startswith("3000 records,")
    rows = {line[:34].strip(): line[34:].split() for line in run.stdout.splitlines()[2:]}
    per_record = {phase: float(figures[1]) for phase, figures in rows.items()}
    for phase in ("split", "check", "apply", "sha256 per record (hashlib)"):
        assert per_record[phase] > 0, phase  # microseconds a record, never 0 at 2 decimals
    assert {"read", "index sort", "sha256 whole file", "crc32 whole file"} <= set(per_record)
    phases = sum(per_record[phase] for phase in ("split", "check", "apply", "index sort"))
    assert per_record["kvd fast path, all phases"] == pytest.approx(phases, abs=0.05)
