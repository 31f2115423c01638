"""Seals (kvd/log/seal.py): a finished segment read from its seal gives exactly what the
segment gives, and a seal that does not match its segment is never used.

Journals here are written in process through the store (small segments, every
kind of record), then sealed with ``write_seal`` as the server's sealer does,
and replayed as ``kvd serve`` replays them: with the seals, and from a copy
without them, which must agree on every key, value, revision and expiry, on
the head, and on any damage found.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import build_harness
from sortedcontainers import SortedList
from test_scan_ahead import puts, write_segments
from test_startup import child_pids, command_line

from kvd import jsonio
from kvd.config import load_config
from kvd.log.reader import JournalCorrupt
from kvd.log.seal import Sealer, seal_path, write_seal, write_snapshot_seal
from kvd.log.snapshot import SnapshotCorrupt
from kvd.model import Change
from kvd.server import build_context
from kvd.store import concatenated, sorted_list_of

SEGMENT_BYTES = 4096


def write_journal(data_dir: Path, rounds: int = 6) -> None:
    """Simple puts in long runs, with every other kind of record between them."""

    async def run() -> None:
        harness = build_harness(data_dir, **{"journal.segment_bytes": SEGMENT_BYTES})
        harness.ctx.stop_periodic_tasks()
        store = harness.store
        keys = [f"k{n:03d}" for n in range(40)] + ["\u00fcber", "with space", 'quote"d', "tab\tkey", "a/b"]
        for round_ in range(rounds):
            for n, key in enumerate(keys):  # a run of simple puts, keys written again each round
                value = [{"round": round_, "n": n}, f"caf\u00e9 {round_}", 1.5, n][n % 4]
                if round_ == 2 and n % 7 == 0:
                    value = 2**70 + n  # beyond a double: the fast path declines its whole run
                await store.write(Change(op="put", set={key: jsonio.dumps(value)}))
            await store.write(Change(op="delete", keys=(keys[round_],)))
            await store.write(Change(op="put", set={"x": b"1", "y": b"2"}, actor="alice"))  # two keys
            await store.write(Change(op="put", set={"exp": b'"soon"'}, expires={"exp": 4_100_000_000.0}))
            if round_ == 3:
                await store.write(Change(op="clear"))
        await harness.journal.close()

    asyncio.run(run())


def seal_finished(data_dir: Path) -> list[Path]:
    """Seal every live segment but the newest, as the server's sealer would have."""
    segments = sorted(data_dir.glob("[0-9]*.jsonl"))[:-1]
    return [write_seal(path) for path in segments]


def start_up(data_dir: Path) -> dict:
    """Replay as ``kvd serve`` does (seals used, none written); what the store holds."""
    settings = {"journal.data_dir": str(data_dir), "journal.segment_bytes": SEGMENT_BYTES,
                "journal.seal_segments": False}
    ctx = build_context(load_config(None, environ={}, overrides=settings))
    journal = ctx.journal
    try:
        journal.replay()  # type: ignore[union-attr]
        ctx.store.finish_replay()
        return {
            "entries": ctx.store.committed_entries(),
            "index": list(ctx.store._index),
            "seq": journal.last_seq,  # type: ignore[union-attr]
            "head": journal.head_hash,  # type: ignore[union-attr]
            "ts": journal.last_ts,  # type: ignore[union-attr]
            "records": journal.stats.records,  # type: ignore[union-attr]
        }
    finally:
        journal.close_sync()  # type: ignore[union-attr]


def without_seals(data_dir: Path, target: Path) -> Path:
    shutil.copytree(data_dir, target, ignore=shutil.ignore_patterns("*.seal"))
    return target


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("sealed") / "data"
    write_journal(data_dir)
    seals = seal_finished(data_dir)
    assert len(seals) >= 8
    return data_dir


def copy_of(sealed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sealed, tmp_path / "data"))


def test_start_up_from_seals_loads_exactly_what_the_segments_give(sealed, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kvd.journal"):
        from_seals = start_up(copy_of(sealed, tmp_path))
    seals = len(list(sealed.glob("*.seal")))
    assert f"replay: {seals} finished segments read from their seals" in caplog.text
    from_segments = start_up(without_seals(sealed, tmp_path / "plain"))
    assert from_seals == from_segments
    assert from_seals["index"] == sorted(from_seals["entries"])
    assert "exp" in from_seals["entries"] and from_seals["entries"]["exp"].expires_at == 4_100_000_000.0


def test_a_seal_keeps_each_key_once_in_key_order(sealed):
    """What makes start-up's index a merge: each run's keys come sorted, and once."""
    from kvd.log.seal import read_seal

    segment = sorted(sealed.glob("[0-9]*.jsonl"))[0]
    seal = read_seal(segment)
    assert seal is not None
    runs = [piece for piece in seal.pieces() if not isinstance(piece, int)]
    assert runs
    for run in runs:
        for keys, values in run.entries():
            assert keys == sorted(set(keys)) and len(values) == len(keys)
        assert len(run) >= sum(len(keys) for keys, _ in run.entries())


@pytest.mark.parametrize("where", ["magic", "header", "payload", "last byte"])
def test_a_damaged_seal_is_ignored_and_the_segment_read_in_full(sealed, tmp_path, caplog, where):
    data_dir = copy_of(sealed, tmp_path)
    seal = sorted(data_dir.glob("*.seal"))[1]
    data = bytearray(seal.read_bytes())
    header_end = data.index(b"\n", data.index(b"\n") + 1)  # the magic line, then the header's
    offset = {"magic": 2, "header": header_end - 20, "payload": header_end + 40, "last byte": len(data) - 1}[where]
    data[offset] ^= 0x20
    seal.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO):
        loaded = start_up(data_dir)
    assert f"ignoring the seal of {seal.stem}.jsonl" in caplog.text
    assert loaded == start_up(without_seals(sealed, tmp_path / "plain"))


def test_a_seal_cut_short_is_ignored(sealed, tmp_path, caplog):
    data_dir = copy_of(sealed, tmp_path)
    seal = sorted(data_dir.glob("*.seal"))[0]
    seal.write_bytes(seal.read_bytes()[:-100])
    with caplog.at_level(logging.INFO):
        loaded = start_up(data_dir)
    assert "ignoring the seal" in caplog.text
    assert loaded == start_up(without_seals(sealed, tmp_path / "plain"))


def test_damage_to_a_sealed_segment_stops_start_up_as_without_the_seal(sealed, tmp_path, caplog):
    """The seal records the segment's CRC-32: a changed segment is read in full, which
    names the damaged record exactly as it does with no seal."""
    data_dir = copy_of(sealed, tmp_path)
    segment = sorted(data_dir.glob("[0-9]*.jsonl"))[2]
    assert seal_path(segment).exists()
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x01
    segment.write_bytes(bytes(data))
    plain = without_seals(data_dir, tmp_path / "plain")
    with pytest.raises(JournalCorrupt) as without:
        start_up(plain)
    with caplog.at_level(logging.WARNING), pytest.raises(JournalCorrupt) as with_seal:
        start_up(data_dir)
    assert f"{segment.name} changed since it was sealed" in caplog.text
    assert (with_seal.value.path.name, with_seal.value.offset, with_seal.value.seq, with_seal.value.reason) == (
        without.value.path.name, without.value.offset, without.value.seq, without.value.reason,
    )


def test_the_newest_segment_is_never_read_from_a_seal(sealed, tmp_path, caplog):
    """The journal's end is where a crash tears a record: the last segment is read from
    its lines, so a torn tail is cut there even when a seal of it exists."""
    data_dir = copy_of(sealed, tmp_path)
    segments = sorted(data_dir.glob("[0-9]*.jsonl"))
    for later in segments[3:]:  # the third segment is now the newest
        later.unlink()
        seal_path(later).unlink(missing_ok=True)
    newest = segments[2]
    assert seal_path(newest).exists()
    expected = start_up(without_seals(data_dir, tmp_path / "plain"))
    with newest.open("ab") as file:
        file.write(b'{"v":1,"seq":')  # a torn record
    with caplog.at_level(logging.INFO):
        loaded = start_up(data_dir)
    assert "replay: 2 finished segments read from their seals" in caplog.text
    assert "cutting torn last record" in caplog.text
    assert loaded == expected


def test_start_up_removes_seals_without_a_segment_and_half_written_ones(sealed, tmp_path):
    data_dir = copy_of(sealed, tmp_path)
    orphan = data_dir / "00000000000099999999.seal"
    shutil.copy(sorted(data_dir.glob("*.seal"))[0], orphan)
    half = data_dir / (sorted(data_dir.glob("*.seal"))[1].name + ".tmp")
    half.write_bytes(b"kvd-seal 1\n{")
    start_up(data_dir)
    assert not orphan.exists() and not half.exists()
    assert len(list(data_dir.glob("*.seal"))) == len(list(sealed.glob("*.seal")))


@pytest.mark.parametrize("archive", [False, True])
def test_compaction_removes_the_seals_of_the_segments_it_retires(tmp_path, archive):
    data_dir = tmp_path / "data"
    write_journal(data_dir, rounds=3)
    seal_finished(data_dir)
    assert list(data_dir.glob("*.seal"))

    async def compact() -> None:
        harness = build_harness(data_dir, **{"journal.segment_bytes": SEGMENT_BYTES, "journal.archive": archive})
        harness.ctx.stop_periodic_tasks()
        await harness.ctx.compactor.compact()
        await harness.journal.close()

    asyncio.run(compact())
    assert list(data_dir.glob("*.seal")) == []
    assert list(data_dir.rglob("*.seal")) == []  # none archived either: they are caches


@pytest.mark.parametrize("kind", ["segment", "snapshot"])
def test_a_seal_that_cannot_be_written_leaves_nothing_behind(compacted, tmp_path, monkeypatch, kind):
    """A full disk (here: fsync failing with ENOSPC) fails the seal and removes its
    temporary files; start-up then reads the file itself."""
    import errno

    from kvd.log import seal as seal_module

    data_dir = without_seals(compacted, tmp_path / "plain")
    target = sorted(data_dir.glob("snapshot-*.jsonl" if kind == "snapshot" else "[0-9]*.jsonl"))[0]

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(seal_module.os, "fsync", no_space)
    write = write_snapshot_seal if kind == "snapshot" else write_seal
    with pytest.raises(OSError, match="No space"):
        write(target)
    assert sorted(path.name for path in data_dir.iterdir() if "seal" in path.name or path.name.endswith(".tmp")) == []


def test_sorted_list_of_keys_in_order_is_a_valid_sorted_list():
    keys = sorted(f"key{n:05d}" for n in range(5000))
    given = list(keys)
    index = sorted_list_of(given)
    index._check()  # SortedList's own invariants
    assert list(index) == keys and index == SortedList(keys)
    assert given == []  # emptied as the sublists were cut, so no second copy stays
    index.add("key00002.5")
    index.remove("key00000")
    index._check()
    assert list(index.irange("key00002", "key00003")) == ["key00002", "key00002.5", "key00003"]
    assert sorted_list_of([]) == SortedList()
    for count in (1, 999, 1000, 1001, 2000, 2001):  # around SortedList's load of 1000
        exact = sorted_list_of([f"k{n:05d}" for n in range(count)])
        exact._check()
        assert list(exact) == [f"k{n:05d}" for n in range(count)]


def test_concatenated_runs_keep_their_order_and_are_consumed():
    runs = [["b", "d"], [], ["a"], ["c", "e", "f"]]
    assert concatenated(runs, 6) == ["b", "d", "a", "c", "e", "f"]
    assert runs == []


def test_the_index_falls_back_to_sorting_when_replay_stored_a_key_twice(sealed, tmp_path):
    """Keys written in more than one segment: the noted lists are not the key set, so
    the index is sorted from the store's own keys; the result is the same."""
    loaded = start_up(copy_of(sealed, tmp_path))
    assert loaded["index"] == sorted(loaded["entries"])


# --- snapshots ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compacted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot (keys with an expiry among them, one with a newline), sealed, and records after it."""
    data_dir = tmp_path_factory.mktemp("compacted") / "data"
    write_journal(data_dir, rounds=2)

    async def compact_then_write() -> None:
        harness = build_harness(data_dir, **{"journal.segment_bytes": SEGMENT_BYTES})
        harness.ctx.stop_periodic_tasks()
        await harness.store.write(Change(op="put", set={"line\nbreak": b'"x"'}))
        await harness.ctx.compactor.compact()
        await harness.store.write(Change(op="put", set={"after": b"1"}))
        await harness.journal.close()

    asyncio.run(compact_then_write())
    [snapshot] = data_dir.glob("snapshot-*.jsonl")
    write_snapshot_seal(snapshot)
    return data_dir


def test_start_up_from_a_sealed_snapshot_loads_what_the_snapshot_gives(compacted, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kvd.journal"):
        from_seal = start_up(copy_of(compacted, tmp_path))
    [snapshot] = compacted.glob("snapshot-*.jsonl")
    assert f"replay: {snapshot.name} loaded from its seal" in caplog.text
    from_snapshot = start_up(without_seals(compacted, tmp_path / "plain"))
    assert from_seal == from_snapshot
    entries = from_seal["entries"]
    assert entries["exp"].expires_at == 4_100_000_000.0 and "line\nbreak" in entries and "after" in entries


@pytest.mark.parametrize("where", ["header", "payload", "last byte"])
def test_a_damaged_snapshot_seal_is_ignored(compacted, tmp_path, caplog, where):
    data_dir = copy_of(compacted, tmp_path)
    [seal] = data_dir.glob("snapshot-*.seal")
    data = bytearray(seal.read_bytes())
    header_end = data.index(b"\n", data.index(b"\n") + 1)
    data[{"header": header_end - 5, "payload": header_end + 30, "last byte": len(data) - 1}[where]] ^= 0x04
    seal.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO):
        loaded = start_up(data_dir)
    assert "ignoring the seal of snapshot-" in caplog.text and "loaded from its seal" not in caplog.text
    assert loaded == start_up(without_seals(compacted, tmp_path / "plain"))


def test_a_sealed_snapshot_changed_since_stops_start_up_as_without_the_seal(compacted, tmp_path, caplog):
    data_dir = copy_of(compacted, tmp_path)
    [snapshot] = data_dir.glob("snapshot-*.jsonl")
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0x01
    snapshot.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt) as without:
        start_up(without_seals(data_dir, tmp_path / "plain"))
    with caplog.at_level(logging.WARNING), pytest.raises(SnapshotCorrupt) as with_seal:
        start_up(data_dir)
    assert f"{snapshot.name} changed since it was sealed" in caplog.text
    assert with_seal.value.reason == without.value.reason


def test_a_damaged_snapshot_gets_no_seal(compacted, tmp_path):
    data_dir = without_seals(compacted, tmp_path / "plain")
    [snapshot] = data_dir.glob("snapshot-*.jsonl")
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0x01
    snapshot.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt):
        write_snapshot_seal(snapshot)
    assert sorted(path.name for path in data_dir.iterdir() if "seal" in path.name) == []


# --- the server ------------------------------------------------------------------------


def wait_for(condition, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def sealers_of(data_dir: Path) -> list[int]:
    """Sealer processes working on ``data_dir``, whoever their parent (now)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = command_line(int(entry.name))
            if any(b"kvd.log.seal" in arg for arg in argv) and any(str(data_dir).encode() in arg for arg in argv):
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_sealer_stopped_mid_seal_leaves_no_temporary_file(tmp_path):
    """The server stopping (Sealer.close) while a large segment is being sealed: the
    sealer removes its temporary files itself (up to 25 MB for a 64 MiB segment)."""
    write_segments(tmp_path, puts(60000), per_segment=60000)
    [segment] = sorted(tmp_path.glob("*.jsonl"))
    sealer = Sealer()
    sealer.seal([segment])
    wait_for(lambda: list(tmp_path.glob("*.tmp")), timeout=60)
    sealer.close()
    assert not seal_path(segment).exists(), "the seal finished before close(): the test needs a larger segment"
    assert sorted(path.name for path in tmp_path.iterdir()) == [segment.name]


@pytest.mark.slow
def test_the_server_seals_what_it_rolls_and_starts_from_the_seals(kvd_process, tmp_path):
    data_dir = tmp_path / "data"
    env = {"KVD_JOURNAL_SEGMENT_BYTES": "4096"}
    server = kvd_process(data_dir=data_dir, env=env)
    values = {f"key{n:04d}": {"n": n, "pad": "x" * (n % 50)} for n in range(300)}
    for key, value in values.items():
        assert server.request("PUT", f"/keys/{key}", value).status in (200, 201)
    segments = sorted(data_dir.glob("[0-9]*.jsonl"))
    assert len(segments) >= 10
    wait_for(lambda: all(seal_path(path).exists() for path in segments[:-1]))
    assert server.kill() == -9  # acknowledged writes are in the journal; seals are only caches

    restarted = kvd_process(data_dir=data_dir, env=env)
    assert f"replay: {len(segments) - 1} finished segments read from their seals" in restarted.log()
    for key, value in values.items():
        assert restarted.get_key(key).json() == {key: value}
    assert restarted.kill(signal.SIGTERM) == 0


@pytest.mark.slow
def test_the_server_seals_the_snapshot_a_compaction_writes(kvd_process, tmp_path):
    data_dir = tmp_path / "data"
    env = {"KVD_JOURNAL_SEGMENT_BYTES": "4096"}
    server = kvd_process(data_dir=data_dir, env=env)
    for n in range(100):
        assert server.request("PUT", f"/keys/key{n:03d}", {"n": n}).status in (200, 201)
    assert server.request("POST", "/journal/compact").status == 200
    [snapshot] = data_dir.glob("snapshot-*.jsonl")
    wait_for(lambda: seal_path(snapshot).exists())
    for n in range(100):  # overwrite everything, compact again: the old snapshot goes, and its seal
        assert server.request("PUT", f"/keys/key{n:03d}", {"n": -n}).status in (200, 201)
    assert server.request("POST", "/journal/compact").status == 200
    [newer] = data_dir.glob("snapshot-*.jsonl")
    assert newer != snapshot and not seal_path(snapshot).exists()
    wait_for(lambda: seal_path(newer).exists())
    assert server.kill(signal.SIGTERM) == 0

    restarted = kvd_process(data_dir=data_dir, env=env)
    assert f"replay: {newer.name} loaded from its seal" in restarted.log()
    assert restarted.get_key("key042").json() == {"key042": {"n": -42}}


@pytest.mark.slow
def test_start_up_seals_finished_segments_that_have_none(kvd_process, tmp_path):
    data_dir = tmp_path / "data"
    write_journal(data_dir, rounds=3)
    segments = sorted(data_dir.glob("[0-9]*.jsonl"))
    assert not list(data_dir.glob("*.seal"))
    env = {"KVD_JOURNAL_SEGMENT_BYTES": "4096"}

    stopped_at_once = kvd_process(data_dir=data_dir, env=env)  # its sealer has barely started
    assert stopped_at_once.kill(signal.SIGTERM) == 0
    assert sealers_of(data_dir) == []  # stopped with the server, by its handle

    server = kvd_process(data_dir=data_dir, env=env)
    wait_for(lambda: all(seal_path(path).exists() for path in segments[:-1]))
    assert not seal_path(segments[-1]).exists()  # the active segment is not finished
    wait_for(lambda: sealers_of(data_dir) == [])  # one process, gone when done
    # ... and reaped: the sealer's thread waits on it (an exited, unreaped child has no
    # command line, so sealers_of no longer sees it a moment before).
    wait_for(lambda: child_pids(server.process.pid) == set())
    assert server.kill(signal.SIGTERM) == 0
    assert list(data_dir.glob("*.tmp")) == []
    assert start_up(data_dir) == start_up(without_seals(data_dir, tmp_path / "plain"))
