"""Compaction: snapshots replace old segments, nothing is lost, serving goes on, crashes at every step are safe.

In-process tests drive the store exactly as ``kvd serve`` wires it; the crash
tests run real ``kvd serve`` processes that SIGKILL themselves at a named
step (``KVD_TEST_CRASH_AT``, see kvd/log/faults.py) and check every
acknowledged write after a restart.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import build_harness

from kvd.log.faults import COMPACTION_STEPS, CRASH_ENV, PAUSE_WRITER_ENV
from kvd.log.format import GENESIS_HASH
from kvd.log.history import History, Layout
from kvd.log.reader import segment_first_seq
from kvd.log.snapshot import SnapshotCorrupt, read_snapshot, snapshot_name, snapshot_seq
from kvd.model import Change

SMALL = {"journal.segment_bytes": 4096}


def value(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def state_of(store) -> dict[str, bytes]:  # noqa: ANN001
    return {key: entry.value for key, entry in store.committed_entries().items()}


async def write_many(store, count: int, keys: int = 40, start: int = 0) -> dict[str, bytes]:  # noqa: ANN001
    """Overwrite a few keys many times (so most of the journal is dead); returns the model."""
    model: dict[str, bytes] = {}
    for i in range(start, start + count):
        key, data = f"k{i % keys}", value({"i": i})
        await store.write(Change(op="put", set={key: data}))
        model[key] = data
    return model


def check_chain(data_dir: Path) -> int:
    """Every retained record checks out and seq runs on without a gap; returns the last seq."""
    history = History(data_dir)
    last = history.oldest_point()
    for record in history.records(last, strict_tail=True):
        assert record.seq == last + 1
        last = record.seq
    return last


def reopen(data_dir: Path, **settings: Any):  # noqa: ANN201
    return build_harness(data_dir, **settings)


# --- in process --------------------------------------------------------------------


def test_compaction_keeps_the_state_and_retires_old_segments(tmp_path):
    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir, **SMALL)
        model = await write_many(harness.store, 400)
        await harness.store.write(Change(op="delete", keys=("k3",)))
        del model["k3"]
        segments_before = len(Layout.scan(data_dir).segments)
        report = await harness.ctx.compactor.compact()
        assert report.seq == 401 and report.keys == len(model)
        assert report.segments_retired == segments_before
        assert report.bytes_after < report.bytes_before / 5
        layout = Layout.scan(data_dir)
        assert [snapshot_seq(path) for path in layout.snapshots] == [401]
        assert [segment_first_seq(path) for path in layout.segments] == [402]
        assert harness.journal.stats.bytes == layout.total_bytes()
        # Writes go on after it, chained to the snapshot's head.
        await harness.store.write(Change(op="put", set={"after": b"1"}))
        model["after"] = b"1"
        assert state_of(harness.store) == model
        await harness.journal.close()
        harness.ctx.stop_periodic_tasks()

        reopened = reopen(data_dir)
        assert state_of(reopened.store) == model
        assert reopened.journal.last_seq == 402
        assert reopened.store.get("k5").revision == 366  # i=365 was seq 366; revisions survive
        assert check_chain(data_dir) == 402
        reopened.journal.close_sync()

    asyncio.run(run())


def test_snapshot_keeps_expiry_times_and_revisions(tmp_path):
    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir)
        far = harness.store.clock() + 3600
        await harness.store.write(Change(op="put", set={"a": b"1", "b": b"[2]"}, expires={"a": far}))
        await harness.ctx.compactor.compact()
        _, entries = read_snapshot(Layout.scan(data_dir).snapshots[0])
        restored = dict(entries)
        assert restored["a"].expires_at == pytest.approx(far, abs=1e-6)
        assert restored["b"].expires_at is None and restored["b"].value == b"[2]"
        assert restored["a"].revision == 1
        await harness.journal.close()
        reopened = reopen(data_dir)
        assert reopened.store.next_expiry() == pytest.approx(far, abs=1e-6)
        reopened.journal.close_sync()

    asyncio.run(run())


@pytest.mark.parametrize("fork", [True, False], ids=["forked-writer", "thread-writer"])
def test_compaction_under_concurrent_writes_loses_nothing(tmp_path, fork):
    """Writers keep going while compactions run; every acknowledged write survives a reopen."""
    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir, **SMALL)
        harness.ctx.compactor.fork = fork
        store = harness.store
        acknowledged: dict[str, bytes] = {}
        stop = asyncio.Event()

        async def writer(name: str) -> None:
            rng = random.Random(name)
            n = 0
            while not stop.is_set():
                key = f"{name}-{rng.randrange(30)}"
                if rng.random() < 0.1 and key in acknowledged:
                    await store.write(Change(op="delete", keys=(key,)))
                    del acknowledged[key]
                else:
                    data = value([name, n])
                    await store.write(Change(op="put", set={key: data}))
                    acknowledged[key] = data
                n += 1

        writers = [asyncio.create_task(writer(f"w{i}")) for i in range(8)]
        reports = []
        for _ in range(5):
            await asyncio.sleep(0.05)
            reports.append(await harness.ctx.compactor.compact())
        stop.set()
        await asyncio.gather(*writers)
        assert all(report.keys > 0 for report in reports)
        assert len({report.seq for report in reports}) == 5  # writes landed between them
        assert state_of(store) == acknowledged
        last = harness.journal.last_seq
        await harness.journal.close()
        reopened = reopen(data_dir)
        assert state_of(reopened.store) == acknowledged
        assert reopened.journal.last_seq == last
        reopened.journal.close_sync()

    asyncio.run(run())


def test_snapshot_equals_the_replayed_history_with_archive_on(tmp_path):
    """With archive on the whole history stays: replaying it to seq S gives the snapshot at S."""
    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir, **SMALL, **{"journal.archive": True})
        await write_many(harness.store, 300)
        first = await harness.ctx.compactor.compact()
        await write_many(harness.store, 200, start=300)
        second = await harness.ctx.compactor.compact()
        await harness.journal.close()
        layout = Layout.scan(data_dir)
        assert [snapshot_seq(path) for path in layout.archived_snapshots] == [first.seq]
        assert [snapshot_seq(path) for path in layout.snapshots] == [second.seq]
        assert segment_first_seq(layout.all_segments[0]) == 1
        history = History(data_dir)
        assert history.oldest_point() == 0
        for report in (first, second):
            replayed: dict[str, Any] = {}
            for record in history.records(0):
                if record.seq > report.seq:
                    break
                replayed.update(record.set)
            path = next(p for p in layout.all_snapshots if snapshot_seq(p) == report.seq)
            header, entries = read_snapshot(path)
            assert {key: entry.value for key, entry in entries} == replayed
            assert header.head == next(r.hash for r in history.records(report.seq - 1))
        assert check_chain(data_dir) == 500

    asyncio.run(run())


def test_without_archive_history_before_the_snapshot_is_gone(tmp_path):
    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir, **SMALL)
        await write_many(harness.store, 100)
        await harness.ctx.compactor.compact()
        await harness.journal.close()

    asyncio.run(run())
    history = History(data_dir)
    assert history.oldest_point() == 100
    assert not Layout.scan(data_dir).archived_segments
    assert list(history.records(100)) == []
    from kvd.log.history import HistoryGone

    with pytest.raises(HistoryGone):
        list(history.records(50))


def test_compaction_is_triggered_by_dead_bytes(tmp_path):
    """The periodic check compacts once dead bytes pass both the ratio and the minimum."""
    data_dir = tmp_path / "data"
    settings = {**SMALL, "journal.compact_min_dead_bytes": 20_000, "journal.compact_check_seconds": 0.02}

    async def run() -> None:
        harness = build_harness(data_dir, **settings)
        compactor = harness.ctx.compactor
        await write_many(harness.store, 20)
        await asyncio.sleep(0.2)
        assert not compactor.due() and harness.journal.stats.compactions == 0  # little dead data
        await write_many(harness.store, 400, start=20)
        for _ in range(500):  # the periodic check compacts until nothing is due
            await asyncio.sleep(0.02)
            if harness.journal.stats.compactions and not compactor.running and not compactor.due():
                break
        assert harness.journal.stats.compactions >= 1
        assert not compactor.due()
        harness.ctx.stop_periodic_tasks()
        await harness.journal.close()

    asyncio.run(run())


def test_a_feed_pin_keeps_segments_until_released(tmp_path):
    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir, **SMALL)
        await write_many(harness.store, 200)
        token = harness.journal.pin(50)  # a reader that has sent records up to 50
        await harness.ctx.compactor.compact()
        assert [r.seq for r in History(data_dir).records(50)][:1] == [51]
        harness.journal.unpin(token)
        await write_many(harness.store, 10, start=200)
        await harness.ctx.compactor.compact()
        assert History(data_dir).first_record_seq() == 211  # all retired once unpinned
        await harness.journal.close()

    asyncio.run(run())


def test_a_damaged_snapshot_stops_start_up_naming_it(tmp_path):
    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir)
        await write_many(harness.store, 30)
        await harness.ctx.compactor.compact()
        await harness.journal.close()

    asyncio.run(run())
    snapshot = Layout.scan(data_dir).snapshots[0]
    damaged = snapshot.read_bytes().replace(b'{"i":7}', b'{"i":8}')
    snapshot.write_bytes(damaged)
    with pytest.raises(SnapshotCorrupt, match="checksum mismatch") as caught:
        reopen(data_dir)
    assert snapshot.name in str(caught.value)
    assert snapshot.read_bytes() == damaged  # left for the operator


def test_a_segment_not_chained_to_the_snapshot_is_damage(tmp_path):
    """A snapshot's head must be the prev of the first record after it."""
    from kvd.log.reader import JournalCorrupt

    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir)
        await write_many(harness.store, 30)
        await harness.ctx.compactor.compact()
        await harness.store.write(Change(op="put", set={"x": b"1"}))
        await harness.journal.close()

    asyncio.run(run())
    segment = Layout.scan(data_dir).segments[-1]
    line = segment.read_bytes()
    head = json.loads(line)["prev"]
    assert head != GENESIS_HASH
    from kvd.log.format import encode_record

    forged, _ = encode_record(seq=31, ts=json.loads(line)["ts"], op="put", prev="1" * 64,
                              set_values={"x": b"2"})
    segment.write_bytes(forged)
    with pytest.raises(JournalCorrupt, match="hash chain broken"):
        reopen(data_dir)


def crashed_before_retiring(data_dir: Path, *, archive: bool) -> tuple[int, list[Path]]:
    """A directory as a crash between the snapshot's rename and retirement leaves it:
    the new snapshot, and the live segments it wholly covers beside the later ones.
    Returns the snapshot's seq and those covered segments."""

    async def run() -> int:
        harness = build_harness(data_dir, **SMALL, **{"journal.archive": True})
        await write_many(harness.store, 200)
        report = await harness.ctx.compactor.compact()
        await write_many(harness.store, 10, start=200)
        await harness.journal.close()
        return report.seq

    seq = asyncio.run(run())
    covered = [path.rename(data_dir / path.name) for path in Layout.scan(data_dir).archived_segments]
    assert len(covered) >= 3 and not Layout.scan(data_dir).archived_snapshots
    if not archive:
        (data_dir / "archive").rmdir()  # as if retirement deleted instead
    return seq, covered


@pytest.mark.parametrize("archive", [False, True], ids=["delete", "archive"])
def test_start_up_checks_and_retires_the_segments_a_snapshot_covers(tmp_path, archive):
    data_dir = tmp_path / "data"
    seq, covered = crashed_before_retiring(data_dir, archive=archive)
    reopened = reopen(data_dir, **SMALL, **{"journal.archive": archive})
    assert reopened.journal.last_seq == seq + 10
    reopened.journal.close_sync()
    layout = Layout.scan(data_dir)
    assert segment_first_seq(layout.segments[0]) == seq + 1  # the retirement was finished
    assert [path.name for path in layout.archived_segments] == (
        [path.name for path in covered] if archive else []
    )


@pytest.mark.parametrize("archive", [False, True], ids=["delete", "archive"])
def test_damage_in_a_segment_the_snapshot_covers_stops_start_up(tmp_path, archive):
    """Not retired unseen: into the archive auditors rely on, or deleted without a word."""
    from kvd.log.reader import JournalCorrupt

    data_dir = tmp_path / "data"
    _, covered = crashed_before_retiring(data_dir, archive=archive)
    damaged = covered[1]
    lines = damaged.read_bytes().splitlines(keepends=True)
    missing = json.loads(lines[2])["seq"]
    damaged.write_bytes(b"".join(lines[:2] + lines[3:]))  # one record deleted
    before = sorted(path.relative_to(data_dir) for path in data_dir.rglob("*"))
    with pytest.raises(JournalCorrupt, match=f"sequence {missing + 1}, expected {missing}") as caught:
        reopen(data_dir, **SMALL, **{"journal.archive": archive})
    assert caught.value.path == damaged and caught.value.seq == missing
    after = sorted(path.relative_to(data_dir) for path in data_dir.rglob("*") if path.name != "LOCK")
    assert after == [path for path in before if path.name != "LOCK"]  # nothing retired


def test_a_covered_segment_must_end_in_the_snapshot_head(tmp_path):
    """The record at the snapshot's seq, rewritten with a valid checksum and link, is caught."""
    from kvd.log.format import encode_record
    from kvd.log.reader import JournalCorrupt

    data_dir = tmp_path / "data"
    seq, covered = crashed_before_retiring(data_dir, archive=True)
    lines = covered[-1].read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    assert last["seq"] == seq
    lines[-1], _ = encode_record(seq=seq, ts=last["ts"], op="put", prev=last["prev"],
                                 set_values={"forged": b"1"})
    covered[-1].write_bytes(b"".join(lines))
    with pytest.raises(JournalCorrupt, match="hash differs from the snapshot's head") as caught:
        reopen(data_dir, **SMALL, **{"journal.archive": True})
    assert caught.value.path == covered[-1] and caught.value.seq == seq


def test_compact_check_seconds_must_be_positive():
    from kvd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="compact_check_seconds"):
        load_config(None, environ={"KVD_JOURNAL_COMPACT_CHECK_SECONDS": "0"})


# --- crash at every step (real processes) -------------------------------------------


def crash_env(step: str, archive: bool) -> dict[str, str]:
    return {
        CRASH_ENV: step,
        "KVD_JOURNAL_SEGMENT_BYTES": "4096",
        "KVD_JOURNAL_COMPACT_MIN_DEAD_BYTES": "8192",
        "KVD_JOURNAL_COMPACT_CHECK_SECONDS": "0.05",
        "KVD_JOURNAL_ARCHIVE": "true" if archive else "false",
    }


def put(port: int, key: str, data: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("PUT", "/keys/" + quote(key, safe=""), body=data,
                           headers={"Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.parametrize("archive", [False, True], ids=["delete", "archive"])
@pytest.mark.parametrize("step", COMPACTION_STEPS)
def test_a_crash_at_each_compaction_step_loses_nothing(kvd_process, tmp_path, step, archive):
    data_dir = tmp_path / "data"
    server = kvd_process(data_dir, env=crash_env(step, archive))
    acknowledged: dict[str, bytes] = {}
    in_flight: tuple[str, bytes] | None = None
    for i in range(20_000):
        key, data = f"k{i % 25}", value({"i": i, "pad": "x" * 40})
        in_flight = (key, data)
        try:
            status = put(server.port, key, data)
        except OSError:
            break  # the server killed itself at the step
        assert status in (200, 201)
        acknowledged[key] = data
        in_flight = None
    else:
        pytest.fail(f"the server never reached {step}")
    assert server.process.wait(timeout=10) == -9, server.log()

    # No compaction of its own (it would leave a temp file of its own when killed below):
    # what is checked is what start-up makes of the crashed one.
    restarted = kvd_process(data_dir, env={**crash_env(step, archive), CRASH_ENV: "",
                                           "KVD_JOURNAL_COMPACT_CHECK_SECONDS": "3600"})
    for key, data in acknowledged.items():
        answer = restarted.get_key(key)
        assert answer.status == 200, (key, restarted.log())
        got = json.dumps(answer.json()[key], separators=(",", ":")).encode()
        assert got == data or (in_flight is not None and (key, got) == in_flight), key
    restarted.kill()
    check_chain(data_dir)
    layout = Layout.scan(data_dir)
    assert not [path for path in data_dir.iterdir() if path.name.endswith(".tmp")]
    if archive:
        assert History(data_dir).oldest_point() == 0  # the whole history is still there
    assert len(layout.snapshots) <= 1


def stopped_writer(server_pid: int, timeout: float = 30.0) -> int:
    """The server's forked snapshot writer, once it has stopped itself (``KVD_TEST_PAUSE_WRITER_AT``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for children in Path(f"/proc/{server_pid}/task").glob("*/children"):
            try:
                pids = children.read_text().split()
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
            for pid in pids:
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
                except (FileNotFoundError, IndexError):
                    continue
                if state in ("T", "t"):
                    return int(pid)
        time.sleep(0.01)
    raise AssertionError("the snapshot writer never stopped at its pause point")


@pytest.mark.slow
def test_a_killed_snapshot_writer_leaves_no_temp_file_and_compaction_goes_on(kvd_process, tmp_path):
    """SIGKILL of the forked writer mid-snapshot (the OOM killer's pick): it cannot remove its
    temp file, so the server does; nothing is retired, serving goes on, the next compaction works."""
    data_dir = tmp_path / "data"
    server = kvd_process(data_dir, env={
        PAUSE_WRITER_ENV: "snapshot-written",  # the temp file is written, not yet renamed
        "KVD_JOURNAL_SEGMENT_BYTES": "4096",
        "KVD_JOURNAL_COMPACT_CHECK_SECONDS": "3600",  # only the compactions asked for below
        "KVD_JOURNAL_SEAL_SEGMENTS": "false",  # a sealer's own temp files would blur the check
    })
    for i in range(100):
        assert put(server.port, f"k{i % 10}", value({"i": i, "pad": "x" * 40})) in (200, 201)
    segments = Layout.scan(data_dir).segments
    assert len(segments) > 1
    with ThreadPoolExecutor(1) as pool:
        compacting = pool.submit(server.request, "POST", "/journal/compact", timeout=60)
        writer = stopped_writer(server.process.pid)
        assert (data_dir / (snapshot_name(100) + ".tmp")).exists()  # what the kill strands
        os.kill(writer, signal.SIGKILL)
        answer = compacting.result(timeout=60)
    assert (answer.status, answer.json()) == (503, {"error": {
        "code": "unavailable",
        "message": f"compaction failed: snapshot writer (pid {writer}) killed by signal 9 (SIGKILL);"
                   " nothing was retired",
    }})
    assert "Retry-After" not in answer.headers
    assert not [path.name for path in data_dir.iterdir() if path.name.endswith(".tmp")]
    layout = Layout.scan(data_dir)
    assert not layout.snapshots and set(segments) <= set(layout.segments)  # nothing retired

    metrics = server.request("GET", "/metrics").body.decode()
    assert 'internal_error_count_total{error="CompactionFailed"} 1.0' in metrics
    assert "kvd_compactions_total 0.0" in metrics

    assert put(server.port, "after", b"1") in (200, 201)
    assert server.get_key("k3").json() == {"k3": {"i": 93, "pad": "x" * 40}}
    with ThreadPoolExecutor(1) as pool:  # the next writer stops at the same point: let it go on
        compacting = pool.submit(server.request, "POST", "/journal/compact", timeout=60)
        os.kill(stopped_writer(server.process.pid), signal.SIGCONT)
        answer = compacting.result(timeout=60)
    assert answer.status == 200, answer.body
    assert answer.json()["seq"] == 101 and answer.json()["segments_retired"] >= len(segments)
    assert [snapshot_seq(path) for path in Layout.scan(data_dir).snapshots] == [101]
    assert not [path.name for path in data_dir.iterdir() if path.name.endswith(".tmp")]
    assert server.process.poll() is None, server.log()


# --- over HTTP ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_post_journal_compact_runs_one_and_reports_it(api, harness):
    for i in range(50):
        response = await api("PUT", "/keys", {"a": i, f"k{i % 5}": "x" * 50})
        assert response.code == 200
    answer = await api("POST", "/journal/compact", raw=b"")
    assert answer.code == 200, answer.body
    report = json.loads(answer.body)
    assert report["seq"] == 50 and report["keys"] == 6
    assert report["bytes_after"] < report["bytes_before"]
    assert [snapshot_seq(path) for path in Layout.scan(harness.data_dir).snapshots] == [50]
    metrics = (await api("GET", "/metrics")).body.decode()
    assert "kvd_compactions_total 1.0" in metrics
    again = await api("POST", "/journal/compact", raw=b"")
    assert json.loads(again.body)["segments_retired"] == 0  # nothing new since


@pytest.mark.gen_test
async def test_post_journal_compact_is_refused_while_one_runs(api, harness):
    harness.ctx.compactor.running = True
    answer = await api("POST", "/journal/compact", raw=b"")
    assert answer.code == 503 and answer.headers["Retry-After"] == "1"
    assert json.loads(answer.body)["error"]["code"] == "unavailable"
    harness.ctx.compactor.running = False


@pytest.mark.parametrize("fork", [True, False], ids=["forked-writer", "thread-writer"])
def test_a_failed_snapshot_write_leaves_nothing_and_writes_go_on(tmp_path, monkeypatch, fork):
    """A full disk while writing the snapshot: no temp file left, no segment retired, serving goes on."""
    from kvd.log import snapshot as snapshot_module
    from kvd.log.compaction import CompactionFailed

    data_dir = tmp_path / "data"

    async def run() -> None:
        harness = build_harness(data_dir, **SMALL)
        harness.ctx.compactor.fork = fork
        model = await write_many(harness.store, 200)
        segments = Layout.scan(data_dir).segments
        real_encode = snapshot_module.encode_entry
        calls = 0

        def encode_until_full(key, entry):  # noqa: ANN001, ANN202
            nonlocal calls
            calls += 1
            if calls > 10:
                raise OSError(28, "No space left on device")
            return real_encode(key, entry)

        monkeypatch.setattr(snapshot_module, "encode_entry", encode_until_full)
        # A forked writer reports only its exit status (its traceback goes to the log).
        reason = "exited with status 1" if fork else "snapshot write failed: No space left on device"
        with pytest.raises(CompactionFailed, match=reason):
            await harness.ctx.compactor.compact()
        assert not harness.ctx.compactor.running
        layout = Layout.scan(data_dir)
        assert not layout.snapshots and not list(data_dir.glob("*.tmp"))
        assert set(segments) <= set(layout.segments)  # nothing retired
        model.update(await write_many(harness.store, 20, start=200))
        monkeypatch.setattr(snapshot_module, "encode_entry", real_encode)
        report = await harness.ctx.compactor.compact()
        assert report.seq == 220
        await harness.journal.close()
        assert state_of(reopen(data_dir).store) == model

    asyncio.run(run())


def test_an_existing_archive_keeps_being_filled_with_archive_off(tmp_path, caplog):
    """Deleting segments next to an archive would leave a gap in the archived history."""
    data_dir = tmp_path / "data"

    async def run(archive: bool, start: int) -> None:
        harness = build_harness(data_dir, **SMALL, **{"journal.archive": archive})
        await write_many(harness.store, 100, start=start)
        await harness.ctx.compactor.compact()
        await harness.journal.close()

    asyncio.run(run(True, 0))
    asyncio.run(run(False, 100))
    assert "keep going there although journal.archive is off" in caplog.text
    history = History(data_dir)
    assert history.oldest_point() == 0
    assert [record.seq for record in history.records(0)] == list(range(1, 201))


def test_segments_that_end_before_the_snapshot_go_on_from_it(tmp_path, caplog):
    """What a crash under ``fsync = everysec`` or ``no`` can leave: the snapshot on disk
    before the last records it covers. Its state is kept, and no seq it covers is reused."""
    data_dir = tmp_path / "data"
    seq, covered = crashed_before_retiring(data_dir, archive=False)
    for path in Layout.scan(data_dir).segments:
        if segment_first_seq(path) > seq:
            path.unlink()  # the roll to seq + 1 never reached the disk
    last_covered = Layout.scan(data_dir).segments[-1]
    lines = last_covered.read_bytes().splitlines(keepends=True)
    assert json.loads(lines[-1])["seq"] == seq
    lost = 2  # nor did the last records (here, all of that segment's)
    last_covered.write_bytes(b"".join(lines[:-lost]))
    snapshot = Layout.scan(data_dir).snapshots[-1]
    header, entries = read_snapshot(snapshot)
    assert header.seq == seq
    snapshot_state = {key: entry.value for key, entry in entries}

    async def run() -> int:
        reopened = reopen(data_dir, **SMALL)
        assert reopened.journal.last_seq == seq
        assert state_of(reopened.store) == snapshot_state
        record = await reopened.store.write(Change(op="put", set={"after": b"1"}))
        await reopened.journal.close()
        return record.seq

    assert asyncio.run(run()) == seq + 1
    assert f"records {seq - lost + 1}..{seq} were lost" in caplog.text
    layout = Layout.scan(data_dir)
    assert [segment_first_seq(path) for path in layout.segments] == [seq + 1]  # the short ones retired
    assert check_chain(data_dir) == seq + 1  # the new record is chained to the snapshot's head

    async def again() -> None:
        reopened = reopen(data_dir, **SMALL)
        assert reopened.journal.last_seq == seq + 1
        assert state_of(reopened.store) == {**snapshot_state, "after": b"1"}
        await reopened.journal.close()

    asyncio.run(again())
