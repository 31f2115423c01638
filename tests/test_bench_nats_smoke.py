"""bench/nats.py's short version: file journal, one NATS node and two NATS nodes, no request errors.

Figures are not asserted (machines are noisy); ``make bench-nats`` reports them.
Needs ``wrk`` and ``nats-server`` (Debian packages; ``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_bench
from natsserver import find_nats_server

NATS_SERVER = find_nats_server()


@pytest.mark.slow
@pytest.mark.nats
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
@pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed (apt-get install nats-server)")
def test_bench_nats_smoke_prints_the_table_without_request_errors(tmp_path):
    results = tmp_path / "nats-smoke.json"
    # Pinned as in the real run; --work-dir keeps the data directories under tmp_path.
    run = run_bench(
        "nats.py", "--smoke", "--nats-server", str(NATS_SERVER),
        "--json", str(results), "--work-dir", str(tmp_path / "runs"), timeout=120,
    )
    out = run.stdout
    header = "workload setup      req/s   p50 ms   p99 ms errors kvd RSS MiB nats RSS MiB rec/commit re-decided"
    assert header in out, out
    for workload in ("put", "get", "mixed"):
        for setup in ("file-1", "nats-1", "nats-2"):
            assert any(line.split()[:2] == [workload, setup] for line in out.splitlines()), (workload, setup)
        for ratio in ("NATS 1 node / file 1 node", "NATS 2 nodes / 1 node"):
            assert any(line.split()[:1] == [workload] and ratio in line for line in out.splitlines()), ratio

    data = json.loads(results.read_text())
    assert data["params"]["smoke"] is True
    assert data["failures"] == []
    for workload, setups in data["medians"].items():
        assert set(setups) == {"file-1", "nats-1", "nats-2"}, workload
        for setup, cell in setups.items():
            assert cell["errors"] == 0, (workload, setup)
            assert cell["rps"] > 0, (workload, setup)
            assert cell["rss_hwm_mib"] > 0, (workload, setup)
            assert (cell["nats_rss_hwm_mib"] > 0) == setup.startswith("nats"), (workload, setup)
    two_nodes = data["runs"]["put"]["nats-2"][0]
    assert len(two_nodes["per_node"]) == 2
    assert sum(node["requests"] for node in two_nodes["per_node"]) == two_nodes["requests"]
