"""bench/compaction.py's short version: it compacts under load and reports every figure.

Figures are not asserted (machines are noisy); ``make bench-compaction`` reports them.
Needs ``wrk`` (Debian package; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, run_bench

LATENCY_FIELDS = {"rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "rss_peak_mib"}
REPORT_FIELDS = {"seq", "keys", "segments_retired", "bytes_before", "bytes_after", "seconds"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_bench_compaction_smoke_prints_figures_and_writes_results(tmp_path):
    committed = REPO / "bench" / "results" / "compaction.json"
    committed_before = committed.read_bytes() if committed.exists() else None
    results = tmp_path / "compaction.json"
    run = run_bench("compaction.py", "--smoke", "--no-pin", "--json", str(results))
    for figure in ("idle (wrk)", "idle (client)", "compaction (client)", "compaction of 21000 keys:",
                   "p99 compaction / idle:", "peak RSS compaction / idle:", "client check:",
                   "errors (non-2xx + socket, all rounds): 0"):
        assert figure in run.stdout, figure

    data = json.loads(results.read_text())
    assert data["params"]["smoke"] is True
    assert {"nproc", "cpu", "kvd_commit", "loadavg_start", "loadavg_end"} <= set(data["machine"])
    assert data["journal"]["records"] == 2 * data["journal"]["keys"] == 40_000
    for phase in ("idle_wrk", "idle", "compaction"):
        assert LATENCY_FIELDS <= set(data["median"][phase]), phase
        assert data["median"][phase]["rps"] > 0, phase
    assert data["median"]["compaction"]["seconds"] > 0
    assert data["median"]["unloaded_seconds"] > 0
    assert {"p99_compaction_over_idle", "rps_compaction_over_idle", "rss_peak_compaction_over_idle",
            "client_rps_over_wrk"} <= set(data["ratios"])
    [target] = data["targets"]
    assert isinstance(target["met"], bool) and target["goal"] == 3.0
    assert data["errors"] == 0
    [only] = data["runs"]
    report = only["compaction"]["report"]
    assert set(report) == REPORT_FIELDS
    assert report["keys"] == 21_000  # the journal's 20k keys and the 1000-key working set
    assert report["segments_retired"] >= 1
    assert only["compaction"]["timeline"], "the compaction round keeps its timeline"
    # The smoke run writes only where it was told: the committed full-size results stay.
    after = committed.read_bytes() if committed.exists() else None
    assert after == committed_before
