"""Several kvd nodes on one NATS JetStream stream: real nats-server and kvd processes.

What a client of a cluster relies on: one order of writes across nodes,
compare-and-set with exactly one winner, read-your-writes, no acknowledged
write lost when a kvd node or a NATS server dies, 503 (not stale writes)
while NATS is away, and new nodes starting from a snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from natsserver import NatsCluster, NatsServer, nats_cluster, nats_server  # noqa: F401

from kvd.log.format import segment_name
from kvd.log.reader import JournalReader

pytestmark = pytest.mark.nats


def nats_env(urls: list[str], **settings: Any) -> dict[str, str]:
    env = {
        "KVD_JOURNAL_BACKEND": "nats",
        "KVD_JOURNAL_NATS_SERVERS": ",".join(urls),
        "KVD_PLUGINS_ENABLED": "expiry,metrics,filter",
    }
    for name, value in settings.items():
        env[f"KVD_{name.upper()}"] = str(value)
    return env


def start_nodes(kvd_process, tmp_path: Path, urls: list[str], count: int, **settings: Any) -> list[Any]:
    return [
        kvd_process(data_dir=tmp_path / f"node{i}", env=nats_env(urls, **settings))
        for i in range(count)
    ]


def consistent_state(node) -> dict[str, Any]:
    response = node.request("GET", "/keys?consistent=1")
    assert response.status == 200, response.body
    return response.json()


def journal_lines(node) -> list[dict[str, Any]]:
    node.request("GET", "/keys?consistent=1")
    response = node.request("GET", "/journal")
    assert response.status == 200
    return [json.loads(line) for line in response.body.splitlines() if line]


def etag(response) -> str:
    return response.headers["ETag"]


# --- one order, compare-and-set, read-your-writes ------------------------------


def test_writes_on_either_node_form_one_chain_read_by_both(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2)
    assert a.request("PUT", "/keys/x", 1).status == 201
    # Read-your-writes: the node that answered has applied it.
    assert a.get_key("x").json() == {"x": 1}
    assert b.request("PUT", "/keys", {"y": 2, "z": 3}).status == 200
    assert b.get_key("y").json() == {"y": 2}
    assert a.request("DELETE", "/keys/x").status == 204
    assert consistent_state(a) == consistent_state(b) == {"y": 2, "z": 3}
    assert a.request("GET", "/keys/y?consistent=1").headers["ETag"] == b.get_key("y").headers["ETag"]
    lines_a, lines_b = journal_lines(a), journal_lines(b)
    assert lines_a == lines_b
    assert [line["seq"] for line in lines_a] == [1, 2, 3]
    assert [line["prev"] for line in lines_a[1:]] == [line["hash"] for line in lines_a[:-1]]


def test_if_match_raced_on_two_nodes_has_exactly_one_winner(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2)
    a.request("PUT", "/keys/k", 0)
    for round_ in range(8):
        tag = etag(a.request("GET", "/keys/k?consistent=1"))
        assert etag(b.request("GET", "/keys/k?consistent=1")) == tag
        barrier = threading.Barrier(16)

        def attempt(
            i: int, tag: str = tag, round_: int = round_, barrier: threading.Barrier = barrier
        ) -> int:
            node = (a, b)[i % 2]
            barrier.wait()
            return node.request("PUT", "/keys/k", {"round": round_, "writer": i}, {"If-Match": tag}).status

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(attempt, range(16)))
        assert sorted(statuses) == [200] + [412] * 15, statuses


def test_compare_and_set_increments_from_both_nodes_lose_nothing(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2)
    a.request("PUT", "/keys/counter", 0)
    per_worker, workers = 15, 8

    def increment(i: int) -> int:
        node = (a, b)[i % 2]
        done = conflicts = 0
        while done < per_worker:
            current = node.request("GET", "/keys/counter?consistent=1")
            value = current.json()["counter"]
            answer = node.request("PUT", "/keys/counter", value + 1, {"If-Match": etag(current)})
            if answer.status == 200:
                done += 1
            else:
                assert answer.status == 412, answer.body
                conflicts += 1
        return conflicts

    # Rounds until both races have happened: a 412 (a stale If-Match seen at once) and a
    # superseded write (both nodes' checks passed, the stream ordered one first). One
    # round almost always has both; how often the second happens depends on timing.
    conflicts = superseded = 0.0
    for rounds in range(1, 6):
        with ThreadPoolExecutor(workers) as pool:
            conflicts += sum(pool.map(increment, range(workers)))
        increments = rounds * per_worker * workers
        assert consistent_state(a)["counter"] == consistent_state(b)["counter"] == increments
        figures = [metrics(node) for node in (a, b)]
        assert sum(f["kvd_nats_published_records_total"] for f in figures) == increments + 1
        assert all(f["kvd_nats_received_records_total"] == increments + 1 for f in figures)
        assert all(f["kvd_nats_connected"] == 1 for f in figures)
        superseded = sum(f["kvd_nats_superseded_writes_total"] for f in figures)
        if conflicts and superseded:
            break
    assert conflicts > 0 and superseded > 0, (conflicts, superseded)  # the races really happened


def metrics(node) -> dict[str, float]:
    text = node.request("GET", "/metrics").body.decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines() if line.startswith("kvd_nats_")
    }


def test_patches_racing_on_two_nodes_all_merge(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2)
    a.request("PUT", "/keys/doc", {})
    barrier = threading.Barrier(20)

    def patch(i: int) -> int:
        barrier.wait()
        return (a, b)[i % 2].request(
            "PATCH", "/keys/doc", {f"field{i}": i}, {"Content-Type": "application/merge-patch+json"}
        ).status

    with ThreadPoolExecutor(20) as pool:
        assert set(pool.map(patch, range(20))) == {200}
    assert consistent_state(b)["doc"] == {f"field{i}": i for i in range(20)}


def test_a_node_killed_mid_write_loses_no_acknowledged_write(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2)
    acknowledged, _ = run_writers([a, b], a.kill, after=0.5)
    assert len(acknowledged) > 50
    state = consistent_state(b)  # b kept serving
    missing = {key for key in acknowledged if state.get(key) != acknowledged[key]}
    assert not missing, sorted(missing)[:10]
    # The killed node comes back, catches up, and agrees.
    restarted = kvd_process(data_dir=tmp_path / "node0", env=nats_env([nats_server.url]))
    assert consistent_state(restarted) == consistent_state(b)


def test_expiry_swept_by_two_nodes_is_journaled_once(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2, plugins_expiry_sweep_interval=0.05)
    assert a.request("PUT", "/keys?expire_in=1", {f"t{i}": i for i in range(50)}).status == 200
    assert b.request("PUT", "/keys/stays", 1).status == 201
    deadline = time.monotonic() + 10
    while consistent_state(b) != {"stays": 1}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # a second sweep would have been journaled by now
    removed = [key for line in journal_lines(a) if line["op"] == "expire" for key in line["keys"]]
    assert sorted(removed) == sorted(f"t{i}" for i in range(50))  # each key once, by one node or the other


# --- NATS away -------------------------------------------------------------------


def test_nats_down_refuses_writes_serves_reads_and_resumes_without_gaps(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    (node,) = start_nodes(kvd_process, tmp_path, [nats_server.url], 1, journal_nats_publish_timeout=1.0)
    assert node.request("PUT", "/keys", {"a": 1, "b": 2}).status == 200
    nats_server.kill()
    refused = node.request("PUT", "/keys/c", 3, timeout=10)
    assert refused.status == 503 and refused.headers.get("Retry-After") == "1", refused.body
    assert node.get_key("a").json() == {"a": 1}  # served from the applied state
    assert node.request("GET", "/keys/a?consistent=1").status == 503
    assert node.request("GET", "/readyz").status == 503
    nats_server.restart(graceful=False)
    deadline = time.monotonic() + 20
    while node.request("GET", "/readyz").status != 200:
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)
    # As a client would: retry a 503 (on a loaded machine the first publish after an
    # unclean JetStream restart can outlast the 1 s timeout). The refused write above
    # "may or may not have been stored" (the client library may deliver it after the
    # reconnect), so c may exist already: 200 or 201.
    while (put := node.request("PUT", "/keys/c", 3)).status == 503:
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.2)
    assert put.status in (200, 201), put.body
    lines = journal_lines(node)
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))  # no gap
    assert [line["set"] for line in lines[1:]] == [{"c": 3}] * (len(lines) - 1)
    assert len(lines) >= 2  # the batch, then c (a refused or retried write may have been stored too)
    assert consistent_state(node) == {"a": 1, "b": 2, "c": 3}


def test_a_node_started_while_nats_is_down_says_so_until_it_is_back(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    (node,) = start_nodes(kvd_process, tmp_path, [nats_server.url], 1)
    assert node.request("PUT", "/keys/a", 1).status == 201
    node.kill()
    nats_server.kill()
    node.start(wait_ready=False)
    body = wait_not_ready(node, b"cannot reach NATS")
    assert nats_server.url.encode() in body, body
    for path in ("/readyz", "/keys", "/keys/a"):
        response = node.request("GET", path)
        assert response.status == 503 and b"cannot reach NATS" in response.body, (path, response.body)
        assert response.headers["Retry-After"] == "1"
    assert node.request("GET", "/healthz").status == 200
    nats_server.restart(graceful=False)
    node.wait_ready(30)
    assert consistent_state(node) == {"a": 1}


def test_a_hung_nats_server_makes_the_node_unready_within_seconds_and_it_recovers(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    """SIGSTOP: the TCP connection stays open, like a partition, and carries nothing."""
    (node,) = start_nodes(kvd_process, tmp_path, [nats_server.url], 1, journal_nats_publish_timeout=1.0)
    assert node.request("PUT", "/keys/a", 1).status == 201
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        body = wait_not_ready(node, b"NATS is unavailable", timeout=10)
        assert time.monotonic() - stopped < 6, body  # docs/nats.md: about 3 s
        assert metrics(node)["kvd_nats_connected"] == 0
        assert node.get_key("a").json() == {"a": 1}  # served from the applied state
        assert node.request("PUT", "/keys/b", 2).status == 503
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    node.wait_ready(20)
    assert metrics(node)["kvd_nats_connected"] == 1
    deadline = time.monotonic() + 20
    while (put := node.request("PUT", "/keys/b", 2)).status == 503:  # as a client would retry
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.2)
    assert put.status in (200, 201), put.body
    assert consistent_state(node) == {"a": 1, "b": 2}


def test_a_single_nats_server_killed_under_load_loses_no_acknowledged_write(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    """SIGKILL of the only NATS server (not a power loss): what it acknowledged is in its files."""
    nodes = start_nodes(kvd_process, tmp_path, [nats_server.url], 2, journal_nats_publish_timeout=2.0)
    acknowledged, refused = run_writers(nodes, lambda: (nats_server.kill(), time.sleep(1.0), nats_server.restart(graceful=False)))
    assert refused > 0  # writes really were refused while it was away
    for node in nodes:
        node.wait_ready(20)
        state = consistent_state(node)
        missing = [key for key, value in acknowledged.items() if state.get(key) != value]
        assert not missing, (len(missing), sorted(missing)[:5])
    lines = journal_lines(nodes[0])
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))


def run_writers(nodes: list[Any], fault, threads_per_node: int = 3, before: float = 1.0, after: float = 1.0) -> tuple[dict[str, int], int]:
    """Writers on every node, ``fault()`` in the middle; returns (acknowledged writes, 503s)."""
    acknowledged: dict[str, int] = {}
    refused = 0
    lock = threading.Lock()
    stop = threading.Event()

    def writer(node, name: str) -> None:
        nonlocal refused
        i = 0
        while not stop.is_set():
            try:
                status = node.request("PUT", f"/keys/{name}-{i}", i, timeout=30).status
            except OSError:
                status = 0
            with lock:
                if status in (200, 201):
                    acknowledged[f"{name}-{i}"] = i
                else:
                    assert status in (0, 503), status
                    refused += 1
            if status != 201:
                time.sleep(0.05)
            i += 1

    threads = [threading.Thread(target=writer, args=(node, f"n{n}w{t}"))
               for n, node in enumerate(nodes) for t in range(threads_per_node)]
    for thread in threads:
        thread.start()
    time.sleep(before)
    fault()
    time.sleep(after)
    stop.set()
    for thread in threads:
        thread.join()
    return acknowledged, refused


# --- compaction and start-up -------------------------------------------------------


def test_new_node_starts_from_the_shared_snapshot_and_the_stream_is_trimmed(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    settings = {
        "journal_compact_dead_ratio": 0.1, "journal_compact_min_dead_bytes": 0,
        "journal_compact_check_seconds": 0.2,
    }
    (a,) = start_nodes(kvd_process, tmp_path, [nats_server.url], 1, **settings)
    for round_ in range(3):
        for i in range(40):
            a.request("PUT", "/keys", {f"k{j}": [round_, i, j] for j in range(10)})
        deadline = time.monotonic() + 20
        while len(snapshot_objects(nats_server)) <= round_ and time.monotonic() < deadline:
            time.sleep(0.1)
    objects = snapshot_objects(nats_server)
    assert len(objects) >= 2, objects
    expected = consistent_state(a)
    newcomer = kvd_process(data_dir=tmp_path / "newcomer", env=nats_env([nats_server.url]))
    assert "loading snapshot" in newcomer.log()
    assert consistent_state(newcomer) == expected
    assert newcomer.request("GET", "/keys/k1?at=1").status == 410  # its history starts at the snapshot
    # The stream keeps only what follows the second-newest snapshot.
    first_record = journal_head_first_seq(nats_server)
    assert first_record > 1
    assert newcomer.request("PUT", "/keys/after", True).status == 201
    assert a.request("GET", "/keys/after?consistent=1").status == 200


def test_a_node_whose_copy_was_trimmed_from_the_stream_restarts_from_the_snapshot(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    settings = {
        "journal_compact_dead_ratio": 0.1, "journal_compact_min_dead_bytes": 0,
        "journal_compact_check_seconds": 0.2,
    }
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2, **settings)
    assert b.request("PUT", "/keys/from-b", 1).status == 201
    b.kill()
    behind = journal_head_first_seq(nats_server)
    for round_ in range(4):
        for i in range(30):
            a.request("PUT", "/keys", {f"k{j}": [round_, i] for j in range(5)})
        deadline = time.monotonic() + 20
        while len(snapshot_objects(nats_server)) < min(round_ + 1, 2) and time.monotonic() < deadline:
            time.sleep(0.1)
    deadline = time.monotonic() + 20
    while journal_head_first_seq(nats_server) <= 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # trimmed past what b has
    assert journal_head_first_seq(nats_server) > 2 >= behind
    restarted = kvd_process(data_dir=tmp_path / "node1", env=nats_env([nats_server.url], **settings))
    assert "loading snapshot" in restarted.log()
    assert consistent_state(restarted) == consistent_state(a)
    assert restarted.request("PUT", "/keys/again", 2).status == 201
    assert a.request("GET", "/keys/again?consistent=1").status == 200
    verify = subprocess.run(  # the replaced copy left nothing behind that breaks the chain
        [sys.executable, "-m", "kvd", "journal", "verify", "--data-dir", str(tmp_path / "node1")],
        capture_output=True, text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_local_copy_that_diverges_from_the_stream_stops_start_up(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    (a,) = start_nodes(kvd_process, tmp_path, [nats_server.url], 1, journal_nats_stream="FIRST")
    a.request("PUT", "/keys", {"x": 1, "y": 2})
    a.kill()
    other = kvd_process(data_dir=tmp_path / "other", env=nats_env([nats_server.url], journal_nats_stream="SECOND"))
    for i in range(3):
        other.request("PUT", f"/keys/z{i}", i)
    wrong = kvd_process(
        data_dir=tmp_path / "node0", env=nats_env([nats_server.url], journal_nats_stream="SECOND"),
        wait_ready=False,
    )
    assert wrong.process.wait(timeout=30) == 1, wrong.log()
    assert "does not continue the chain" in wrong.log()


def test_a_local_copy_of_another_stream_stops_start_up(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    (a,) = start_nodes(kvd_process, tmp_path, [nats_server.url], 1)
    a.request("PUT", "/keys/x", 1)
    a.kill()
    other = kvd_process(
        data_dir=tmp_path / "node0", env=nats_env([nats_server.url], journal_nats_stream="OTHER"),
        wait_ready=False,
    )
    assert other.process.wait(timeout=30) == 1
    assert "stream OTHER is empty" in other.log()


def test_with_archive_the_stream_keeps_all_history_for_auditors(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    settings = {
        "journal_archive": "true", "journal_compact_dead_ratio": 0.1,
        "journal_compact_min_dead_bytes": 0, "journal_compact_check_seconds": 0.2,
    }
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2, **settings)
    for round_ in range(3):
        for i in range(20 * round_, 20 * round_ + 20):
            (a, b)[i % 2].request("PUT", "/keys", {"k": i, "other": [i]})
        deadline = time.monotonic() + 20
        while len(snapshot_objects(nats_server)) <= round_:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert journal_head_first_seq(nats_server) == 1  # nothing trimmed
    audit = [sys.executable, "-m", "kvd", "journal"]
    source = ["--nats", nats_server.url, "--stream", "KVD"]
    verify = subprocess.run([*audit, "verify", *source], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    replay = subprocess.run([*audit, "replay", *source, "--seq", "7"], capture_output=True, text=True)
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout) == {"k": 6, "other": [6]}
    # A node's own ?at= reaches back to seq 1 too (its copy archived what it compacted).
    assert a.request("GET", "/keys/k?at=3").json() == {"k": 2}


def test_a_forged_record_in_the_stream_is_refused_not_applied(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    (node,) = start_nodes(kvd_process, tmp_path, [nats_server.url], 1)
    assert node.request("PUT", "/keys/a", 1).status == 201
    head = journal_lines(node)[-1]
    forged = json.dumps({
        "v": 1, "seq": 2, "ts": head["ts"], "op": "put", "set": {"a": 666},
        "prev": head["hash"], "hash": "0" * 64,
    }, separators=(",", ":")) + "\n"
    _run_nats(nats_server, "publish", forged)
    deadline = time.monotonic() + 10
    while (ready := node.request("GET", "/readyz")).status == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert b"stream seq 2" in ready.body and b"checksum" in ready.body, ready.body
    assert node.get_key("a").json() == {"a": 1}  # never applied
    assert node.request("PUT", "/keys/b", 2).status == 503


# --- a node that cannot follow the stream -------------------------------------------


def wait_not_ready(node, *reasons: bytes, timeout: float = 15.0) -> bytes:
    """The body of the first 503 from ``/readyz`` that gives one of ``reasons``."""
    deadline = time.monotonic() + timeout
    while (ready := node.request("GET", "/readyz")).status != 503 or not any(r in ready.body for r in reasons):
        assert time.monotonic() < deadline, (ready.body, node.log())
        time.sleep(0.05)
    return ready.body


def local_records(data_dir: Path) -> list[Any]:
    return list(JournalReader(data_dir).records())


def test_a_local_copy_the_disk_refuses_stops_the_node_until_a_restart_catches_up(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2)
    value = "v" * 2000
    for i in range(40):  # a's segment grows past its log, which must stay writable
        assert b.request("PUT", f"/keys/k{i}", value).status == 201
    state = consistent_state(a)
    segment = tmp_path / "node0" / segment_name(1)
    limit = segment.stat().st_size + 3000  # room for one more record, not two
    subprocess.run(["prlimit", "--pid", str(a.process.pid), f"--fsize={limit}:"], check=True)  # soft only
    for i in range(40, 50):  # committed by the stream; a can write only the first
        assert b.request("PUT", f"/keys/k{i}", value).status == 201
    body = wait_not_ready(a, b"local copy")
    assert b"File too large" in body, body
    assert "CRITICAL" in a.log()
    held = local_records(tmp_path / "node0")
    assert [r.seq for r in held] == list(range(1, len(held) + 1)) and 40 <= len(held) < 50
    assert a.request("PUT", "/keys/x", 1).status == 503
    assert a.request("GET", "/keys?consistent=1").status == 503
    assert a.request("GET", "/keys").json() == {**state, **{f"k{i}": value for i in range(40, len(held))}}

    # The disk takes writes again: the node stays out until restarted, and skips nothing.
    subprocess.run(["prlimit", "--pid", str(a.process.pid), "--fsize=unlimited:"], check=True)
    assert b.request("PUT", "/keys/later", 1).status == 201
    time.sleep(0.5)
    assert a.request("GET", "/readyz").status == 503
    assert a.request("PUT", "/keys/x", 1).status == 503
    assert [r.seq for r in local_records(tmp_path / "node0")] == [r.seq for r in held]
    a.kill()
    restarted = kvd_process(data_dir=tmp_path / "node0", env=nats_env([nats_server.url]))
    assert consistent_state(restarted) == consistent_state(b)
    assert journal_lines(restarted) == journal_lines(b)
    assert restarted.request("PUT", "/keys/x", 1).status == 201


def lose_the_tail(server: NatsServer, tmp_path: Path, write: Any) -> None:
    """``write()`` acknowledged writes, then have the server lose them: its store
    comes back from a copy taken before, as after an R1 power cut."""
    server.stop()
    backup = tmp_path / "store-backup"
    shutil.copytree(server.store_dir, backup)
    server.restart(graceful=False)
    write()
    server.kill()
    shutil.rmtree(server.store_dir)
    shutil.copytree(backup, server.store_dir)


def test_a_stream_that_lost_what_a_node_applied_stops_that_node(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    (a,) = start_nodes(kvd_process, tmp_path, [nats_server.url], 1, journal_nats_publish_timeout=2.0)
    for i in range(5):
        assert a.request("PUT", f"/keys/k{i}", i).status == 201

    def acknowledged() -> None:
        a.wait_ready(20)
        for i in range(5, 10):
            assert a.request("PUT", f"/keys/k{i}", i).status == 201

    lose_the_tail(nats_server, tmp_path, acknowledged)
    nats_server.restart(graceful=False)
    body = wait_not_ready(a, b"NATS lost messages this node applied")
    assert b"ends at seq 5" in body, body
    assert "CRITICAL" in a.log()
    assert a.request("PUT", "/keys/x", 1).status == 503
    assert a.request("GET", "/keys?consistent=1").status == 503
    # Another node follows the stream as it is; a never publishes onto it.
    b = kvd_process(data_dir=tmp_path / "node1", env=nats_env([nats_server.url]))
    for i in range(8):
        assert b.request("PUT", f"/keys/n{i}", i).status == 201
    assert a.request("PUT", "/keys/x", 1).status == 503
    lines = journal_lines(b)
    assert [line["seq"] for line in lines] == list(range(1, 14))
    assert [line["prev"] for line in lines[1:]] == [line["hash"] for line in lines[:-1]]
    assert b.request("GET", "/readyz").status == 200
    assert a.get_key("k9").json() == {"k9": 9}  # a keeps what it applied, for recovery


def test_a_stream_that_lost_a_nodes_records_and_took_others_is_never_forked(nats_server: NatsServer, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    """The stream is back at the node's last stream seq, with other records there:
    Nats-Expected-Last-Sequence would accept the node's next record, chained to a
    record the stream no longer has. The node must find that out first."""
    a, b = start_nodes(kvd_process, tmp_path, [nats_server.url], 2, journal_nats_publish_timeout=2.0)
    for i in range(5):
        assert a.request("PUT", f"/keys/k{i}", i).status == 201

    def acknowledged() -> None:
        a.wait_ready(20)
        b.wait_ready(20)
        for i in range(5, 10):
            assert a.request("PUT", f"/keys/k{i}", i).status == 201
        consistent_state(b)

    lose_the_tail(nats_server, tmp_path, acknowledged)
    a.process.send_signal(signal.SIGSTOP)  # a learns of it only once the stream has grown back
    try:
        b.kill()
        nats_server.restart(graceful=False)
        fresh = kvd_process(data_dir=tmp_path / "fresh", env=nats_env([nats_server.url]))
        for i in range(5):  # stream seqs 6..10 again, other records
            assert fresh.request("PUT", f"/keys/n{i}", i).status == 201
    finally:
        a.process.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while (put := a.request("PUT", "/keys/x", 1)).status == 503 and time.monotonic() < deadline:
        if b"NATS lost messages" in a.request("GET", "/readyz").body:
            break
        time.sleep(0.02)
    assert put.status == 503, put.body  # a 2xx here is record 11 chained onto a's lost record 10
    wait_not_ready(a, b"NATS lost messages this node applied")
    assert fresh.request("PUT", "/keys/after", 1).status == 201
    assert fresh.request("GET", "/readyz").status == 200
    lines = journal_lines(fresh)  # one chain, nothing of a's after the loss
    assert [line["seq"] for line in lines] == list(range(1, 12))
    assert [line["prev"] for line in lines[1:]] == [line["hash"] for line in lines[:-1]]
    assert "x" not in consistent_state(fresh)


# --- a 3-server NATS cluster ------------------------------------------------------------


def test_killing_a_nats_server_under_load_loses_no_acknowledged_write(nats_cluster: NatsCluster, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    nodes = start_nodes(
        kvd_process, tmp_path, nats_cluster.urls, 2,
        journal_nats_replicas=3, journal_nats_publish_timeout=15.0,
    )
    victims: list[int] = []

    def kill_the_stream_leader() -> None:
        leader = nats_cluster.stream_leader("KVD")
        victims.append(leader if leader is not None else 0)
        nats_cluster[victims[0]].kill()

    # Stream leader re-election takes 5-8 s after a SIGKILL; writes go on after it.
    acknowledged, _ = run_writers(nodes, kill_the_stream_leader, after=12.0)
    assert len(acknowledged) > 100
    for node in nodes:
        state = consistent_state(node)
        missing = [key for key, value in acknowledged.items() if state.get(key) != value]
        assert not missing, (len(missing), sorted(missing)[:5])
    nats_cluster[victims[0]].restart()
    verify = subprocess.run(
        [sys.executable, "-m", "kvd", "journal", "verify", "--data-dir", str(tmp_path / "node0")],
        capture_output=True, text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_stream_without_quorum_makes_nodes_unready_until_it_is_back(nats_cluster: NatsCluster, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    (node,) = start_nodes(
        kvd_process, tmp_path, nats_cluster.urls, 1,
        journal_nats_replicas=3, journal_nats_publish_timeout=2.0,
    )
    assert node.request("PUT", "/keys/before", 1).status == 201
    survivor = nats_cluster.stream_leader("KVD") or 0
    down = [i for i in range(3) if i != survivor]
    for i in down:
        nats_cluster[i].kill()
    refused = node.request("PUT", "/keys/during", 2, timeout=30)
    assert refused.status == 503, refused.body
    assert node.request("GET", "/readyz").status == 503  # connected, but nothing is confirmed
    assert node.get_key("before").status == 200  # reads go on
    for i in down:
        nats_cluster[i].restart()
    deadline = time.monotonic() + 40
    while node.request("GET", "/readyz").status != 200:  # back without any write
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.2)
    # The first writes may still answer 503 while this node's subscription
    # moves to a live server; a client retries them, as Retry-After says.
    deadline = time.monotonic() + 30
    while (put := node.request("PUT", "/keys/after", 3, timeout=30)).status == 503:
        assert put.headers.get("Retry-After") == "1" and time.monotonic() < deadline, put.body
        time.sleep(0.5)
    assert put.status in (200, 201), put.body
    assert set(consistent_state(node)) <= {"before", "during", "after"}


def test_reconnecting_to_a_stream_without_quorum_is_not_ready(nats_cluster: NatsCluster, kvd_process, tmp_path: Path) -> None:  # noqa: F811
    """The node's own server and one more go away: it reconnects to the survivor, whose
    stream has no quorum. Not ready, though no write has failed yet (found as a flake of
    the test above: a write refused while disconnected, then ready after reconnecting)."""
    (node,) = start_nodes(kvd_process, tmp_path, nats_cluster.urls, 1, journal_nats_replicas=3)
    assert node.request("PUT", "/keys/before", 1).status == 201
    own = next(i for i in range(3) if f"connected to NATS {nats_cluster[i].url[len('nats://'):]}" in node.log())
    down = [own, (own + 1) % 3]
    for i in down:
        nats_cluster[i].kill()
    deadline = time.monotonic() + 30
    while "NATS reconnected" not in node.log():
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)
    for _ in range(10):  # over two probe intervals
        assert node.request("GET", "/readyz").status == 503
        time.sleep(0.2)
    for i in down:
        nats_cluster[i].restart()
    deadline = time.monotonic() + 40
    while node.request("GET", "/readyz").status != 200:
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.2)


# --- helpers reading NATS directly ------------------------------------------------------


def snapshot_objects(server: NatsServer) -> list[str]:
    return _run_nats(server, "objects")


def journal_head_first_seq(server: NatsServer) -> int:
    return _run_nats(server, "first")


def _run_nats(server: NatsServer, what: str, payload: str = "") -> Any:
    """Ask NATS in a fresh interpreter (the tests' threads have no event loop)."""
    script = f"""
import asyncio, json, nats
from kvd.log import nats_stream
async def main():
    nc = await nats.connect({server.url!r})
    js = nc.jetstream()
    if {what!r} == "publish":
        await js.publish(nats_stream.subject("KVD"), {payload!r}.encode(),
                         headers={{"Kvd-First-Seq": "2", "Kvd-Last-Seq": "2"}})
        result = None
    elif {what!r} == "objects":
        store = await nats_stream.ensure_bucket(js, "KVD", 1)
        result = [item.name for item in await nats_stream.list_snapshots(store)]
    else:
        where = await nats_stream.position(js, "KVD")
        result = (await nats_stream.record_range(js, "KVD", where.first))[0]
    await nc.close()
    print(json.dumps(result))
asyncio.run(main())
"""
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(output.stdout)
