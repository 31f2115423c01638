"""bench --kvd-path: the benchmarks run the kvd of the checkout they are given.

A before/after comparison starts the same interpreter on two checkouts; it
is only worth anything if each server really imports its own checkout's kvd,
also from an environment where another kvd is installed (editable).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, load_bench_module

servers = load_bench_module("servers")


def imported_kvd(opts: servers.Options, cwd: Path) -> Path:
    found = subprocess.run(
        [sys.executable, "-c", "import kvd; print(kvd.__file__)"],
        env=servers.kvd_env(opts), cwd=cwd, capture_output=True, text=True, check=True,
    )
    return Path(found.stdout.strip()).resolve()


def test_a_server_imports_the_kvd_of_the_checkout_it_is_given(tmp_path):
    other = tmp_path / "other-checkout"
    (other / "kvd").mkdir(parents=True)
    (other / "kvd" / "__init__.py").write_text("")
    run_dir = tmp_path / "run"  # servers start in their data directory
    run_dir.mkdir()
    assert imported_kvd(servers.Options(kvd_path=other), run_dir) == other / "kvd" / "__init__.py"
    assert imported_kvd(servers.Options(), run_dir) == (REPO / "kvd" / "__init__.py").resolve()


def test_each_repeat_runs_every_server_once_and_no_server_always_first():
    names = ["bare", "bare-uvloop", "kvd", "kvd-everysec", "webdis", "etcd", "flask"]
    orders = [servers.run_order(names, repeat, 3) for repeat in range(3)]
    assert all(sorted(order) == sorted(names) for order in orders)
    assert len({order[0] for order in orders}) == 3
    for name in names:  # a different place in each repeat
        assert len({order.index(name) for order in orders}) == 3
    assert servers.run_order(names, 0, 1) == names
    assert servers.run_order(["kvd", "bare-uvloop"], 1, 2) == ["bare-uvloop", "kvd"]
