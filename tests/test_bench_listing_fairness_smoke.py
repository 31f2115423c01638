"""bench/listing_fairness.py's short version: it measures both rounds and reports every figure.

Figures are not asserted (machines are noisy); ``make bench-listing`` reports them.
Needs ``wrk`` (Debian package; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_bench


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_bench_listing_fairness_smoke_prints_figures(tmp_path):
    results = tmp_path / "listing.json"
    run = run_bench("listing_fairness.py", "--smoke", "--no-pin", "--json", str(results))
    for figure in ("listing fairness: 20000 keys", "get alone", "get during listings", "put alone",
                   "put during listings", "p99 during listings / alone: get ",
                   "errors (non-2xx + socket, all rounds): 0"):
        assert figure in run.stdout, figure
    data = json.loads(results.read_text())
    assert data["listings"] >= 1 and set(data["p99_ratios"]) == {"get", "put"}
    during = data["runs"]["get during listings"][0]
    assert during["listing_bytes"] > 20_000 * 100  # whole listings of every key were read
    assert all(data["medians"][name]["rps"] > 0 for name in data["medians"])
