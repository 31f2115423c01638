"""The benchmark suite's short version: every server answers every workload without errors.

Figures are not asserted (machines are noisy); ``make bench`` reports them.
Needs ``wrk`` (Debian package; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_bench


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_bench_smoke_runs_every_workload_without_errors(tmp_path):
    results = tmp_path / "smoke.json"
    run_bench("run.py", "--smoke", "--no-pin", "--json", str(results))
    medians = json.loads(results.read_text())["medians"]
    assert set(medians) == {"put", "get", "mixed", "list"}
    for workload, servers in medians.items():
        assert servers["kvd"]["errors"] == 0, workload
        assert servers["kvd"]["rps"] > 0, workload
