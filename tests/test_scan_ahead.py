"""Start-up's helper process (kvd/log/scan_ahead.py) against the reader alone.

The helper may only change how fast a journal replays, never what replay
accepts, rejects or reports. These tests force it on small journals (the
threshold and the chunk size are lowered; the helper is a real spawned
process) and compare with the full decoder: the same store, the same
damage named at the same offset, the same torn tail.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import signal
import subprocess
import sys

import pytest
from test_simple_puts import TS, mixed_records, replayed_store

from kvd.log import scan_ahead
from kvd.log.format import GENESIS_HASH, decode_record, encode_record, segment_name
from kvd.log.lines import line_start
from kvd.log.reader import JournalCorrupt, JournalReader
from kvd.log.simple_puts import SimplePuts, _unpickle_puts, check_run, split_block
from kvd.store import Store


@pytest.fixture
def helper_on(monkeypatch):
    """The helper for any journal, in 8 KiB chunks, even where one CPU is usable."""
    monkeypatch.setattr(scan_ahead, "MIN_HELPER_BYTES", 0)
    monkeypatch.setattr(scan_ahead, "CHUNK_BYTES", 8192)
    monkeypatch.setattr(scan_ahead, "usable_cpus", lambda: 2)


def write_segments(directory, records: list[dict], per_segment: int) -> list[bytes]:
    """The records as a chain, ``per_segment`` to a segment file; returns the lines."""
    directory.mkdir(parents=True, exist_ok=True)
    lines, prev = [], GENESIS_HASH
    for seq, fields in enumerate(records, start=1):
        line, prev = encode_record(seq=seq, ts=TS, prev=prev, **fields)
        lines.append(line)
    for first in range(0, len(lines), per_segment):
        (directory / segment_name(first + 1)).write_bytes(b"".join(lines[first : first + per_segment]))
    return lines


def puts(count: int, start: int = 0) -> list[dict]:
    return [{"op": "put", "set_values": {f"key{n}": b'"value %d"' % n}} for n in range(start, start + count)]


def read_all(reader: JournalReader) -> list[int]:
    """The seqs the reader yields, in order."""
    seen = []
    for item in reader.items():
        if isinstance(item, SimplePuts):
            seen.extend(range(item.first_seq, item.first_seq + len(item)))
        else:
            seen.append(item.seq)
    return seen


def test_line_start_gives_every_line_to_exactly_one_chunk():
    data = b"".join(b"x" * length + b"\n" for length in (0, 3, 70, 1, 200000, 5)) + b"tail"
    file = io.BytesIO(data)
    cuts = sorted({line_start(file, at) for at in range(0, len(data) + 1, 7)} | {len(data)})
    starts = [0] + [index + 1 for index, byte in enumerate(data) if byte == 10]
    assert set(cuts) <= set(starts) | {len(data)}
    assert line_start(file, 1) == 1  # byte 0 ends the empty first line
    assert line_start(file, 2) == 5
    assert line_start(file, len(data) - 2) == len(data)  # the unterminated tail: no start


@pytest.mark.slow
@pytest.mark.parametrize("per_segment", [3000, 700])
def test_replay_with_the_helper_builds_the_same_store(tmp_path, helper_on, per_segment):
    """Puts, expiries, multi-key puts, deletes and clears, in one segment or several."""
    write_segments(tmp_path, mixed_records(3000), per_segment)
    reader = JournalReader(tmp_path)
    helped = Store()
    for item in reader.items():
        helped.replay_puts(item) if isinstance(item, SimplePuts) else helped.apply(item)
    helped.finish_replay()
    alone = replayed_store(tmp_path, simple_puts=False)
    assert reader.helper_chunks > 5
    assert helped.committed_entries() == alone.committed_entries()
    assert helped.live_bytes == alone.live_bytes and helped._expiry == alone._expiry
    assert reader.last_seq == 3000


@pytest.mark.slow
def test_damage_in_the_helpers_part_is_named_where_it_is(tmp_path, helper_on):
    lines = write_segments(tmp_path, puts(2000), per_segment=2000)
    offset = sum(map(len, lines[:1700]))  # in the helper's later part
    path = tmp_path / segment_name(1)
    data = bytearray(path.read_bytes())
    data[offset + 40] ^= 0x01
    path.write_bytes(bytes(data))
    reader = JournalReader(tmp_path)
    seen: list[int] = []
    with pytest.raises(JournalCorrupt) as caught:
        for item in reader.items():
            seen.extend(range(item.first_seq, item.first_seq + len(item)) if isinstance(item, SimplePuts) else [item.seq])
    assert caught.value.offset == offset and caught.value.seq == 1701
    assert seen == list(range(1, 1701))


@pytest.mark.slow
@pytest.mark.parametrize("boundary", [0, 1, 4])
def test_a_chain_broken_where_a_chunk_begins_is_caught(tmp_path, helper_on, boundary):
    """Each part is checked in itself; the link across a cut (the reader's part to the
    helper's, chunk 0; or one chunk to the next) is the reader's to check."""
    lines = write_segments(tmp_path, puts(2000), per_segment=2000)
    path = tmp_path / segment_name(1)
    chunk = scan_ahead.plan_chunks([path])[boundary]
    with open(path, "rb") as file:
        cut = line_start(file, chunk.start)
    offsets = [sum(map(len, lines[:index])) for index in range(len(lines))]
    first = offsets.index(cut)  # the first record of the chunk, re-chained from elsewhere
    relinked, prev = [], "f" * 64
    for seq in range(first + 1, 2001):
        line, prev = encode_record(seq=seq, ts=TS, prev=prev, **puts(1, seq - 1)[0])
        relinked.append(line)
    path.write_bytes(b"".join(lines[:first] + relinked))
    reader = JournalReader(tmp_path)
    with pytest.raises(JournalCorrupt, match="hash chain broken") as caught:
        read_all(reader)
    assert reader.helper_chunks > boundary
    assert caught.value.seq == first + 1 and caught.value.offset == cut


@pytest.mark.slow
def test_a_torn_tail_in_the_helpers_part_is_reported(tmp_path, helper_on):
    lines = write_segments(tmp_path, puts(1500), per_segment=700)
    last = tmp_path / segment_name(1401)
    last.write_bytes(last.read_bytes() + lines[5][:50])
    reader = JournalReader(tmp_path)
    assert read_all(reader) == list(range(1, 1501))
    assert reader.helper_chunks > 0
    assert reader.torn_tail is not None
    assert reader.torn_tail.path == last and reader.torn_tail.length == 50
    assert reader.torn_tail.offset == sum(map(len, lines[1400:]))
    assert reader.last_line == lines[-1]


@pytest.mark.slow
def test_records_before_a_snapshots_seq_are_checked_not_yielded(tmp_path, helper_on):
    """start_seq in the helper's part: its runs there are decoded in full, as alone."""
    lines = write_segments(tmp_path, puts(2000), per_segment=2000)
    head = decode_record(lines[1499]).hash
    reader = JournalReader(tmp_path, start_seq=1501, start_hash=head)
    assert read_all(reader) == list(range(1501, 2001))
    with pytest.raises(JournalCorrupt, match="snapshot's head"):
        read_all(JournalReader(tmp_path, start_seq=1501, start_hash="a" * 64))


def test_a_failed_helper_leaves_its_chunks_to_the_reader(tmp_path, helper_on, monkeypatch, caplog):
    """A helper that cannot deliver (here: its results cannot be read back) slows replay, no more."""
    write_segments(tmp_path, mixed_records(2000), per_segment=2000)

    def unreadable(data):
        raise pickle.UnpicklingError("damaged result")

    monkeypatch.setattr(scan_ahead.pickle, "loads", unreadable)
    reader = JournalReader(tmp_path)
    helped = Store()
    for item in reader.items():
        helped.replay_puts(item) if isinstance(item, SimplePuts) else helped.apply(item)
    assert reader.helper_chunks > 0 and "replay helper failed" in caplog.text
    assert helped.committed_entries() == replayed_store(tmp_path, simple_puts=False).committed_entries()


def test_one_usable_cpu_or_a_small_journal_means_no_helper(tmp_path, monkeypatch):
    write_segments(tmp_path, puts(100), per_segment=100)
    segments = sorted(tmp_path.iterdir())
    monkeypatch.setattr(scan_ahead, "MIN_HELPER_BYTES", 0)
    monkeypatch.setattr(scan_ahead, "usable_cpus", lambda: 1)
    assert scan_ahead.plan_chunks(segments) == []
    monkeypatch.setattr(scan_ahead, "usable_cpus", lambda: 2)
    assert scan_ahead.plan_chunks(segments) != []
    monkeypatch.setattr(scan_ahead, "MIN_HELPER_BYTES", os.path.getsize(segments[0]))
    assert scan_ahead.plan_chunks(segments) == []  # the helper's share is smaller than that


def test_the_helpers_chunks_cover_the_later_share_in_order(tmp_path, monkeypatch):
    write_segments(tmp_path, puts(3000), per_segment=1000)
    segments = sorted(tmp_path.iterdir())
    monkeypatch.setattr(scan_ahead, "MIN_HELPER_BYTES", 0)
    monkeypatch.setattr(scan_ahead, "usable_cpus", lambda: 2)
    monkeypatch.setattr(scan_ahead, "CHUNK_BYTES", 10000)
    chunks = scan_ahead.plan_chunks(segments)
    sizes = [path.stat().st_size for path in segments]
    assert sum(c.stop - c.start for c in chunks) == sum(sizes) - int(sum(sizes) * (1 - scan_ahead.HELPER_SHARE))
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert (before.path, before.stop) == (after.path, after.start) or (
            after.start == 0 and segments.index(after.path) == segments.index(before.path) + 1
            and before.stop == before.path.stat().st_size
        )
    assert chunks[-1].path == segments[-1] and chunks[-1].stop == sizes[-1]


def test_simple_puts_pickle_as_columns_and_come_back_the_same():
    first, digest = encode_record(seq=1, ts=TS, prev="a" * 64, op="put",
                                  set_values={"caf\u00e9": b'"\xe2\x82\xac"'})
    second, _ = encode_record(seq=2, ts=TS, prev=digest, op="put", set_values={"k": b'{"a":[1,2]}'})
    (run,) = split_block(first + second)
    original = check_run(run)
    assert original is not None and original.keys == ["caf\u00e9", "k"]
    data = pickle.dumps(original)
    assert _unpickle_puts.__name__.encode() in data  # the columns form, not an object a value
    assert pickle.loads(data) == original


@pytest.mark.slow
def test_a_helper_killed_mid_replay_leaves_its_chunks_to_the_reader(tmp_path, helper_on, monkeypatch, caplog):
    """SIGKILL, as the OOM killer would: the reader sees it exit and reads the rest alone."""
    write_segments(tmp_path, mixed_records(3000), per_segment=3000)
    started = scan_ahead.ScanAhead.__init__

    def start_then_kill(self, chunks):
        started(self, chunks)
        self._process.stdout.readline()  # it finished chunk 0
        os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._process.stdout.close()
        self._process.stdout = io.BytesIO(b"0\n")  # chunk 0's line, read above, handed back

    monkeypatch.setattr(scan_ahead.ScanAhead, "__init__", start_then_kill)
    reader = JournalReader(tmp_path)
    helped = Store()
    for item in reader.items():
        helped.replay_puts(item) if isinstance(item, SimplePuts) else helped.apply(item)
    assert "replay helper failed" in caplog.text and "helper exited (-9)" in caplog.text
    assert helped.committed_entries() == replayed_store(tmp_path, simple_puts=False).committed_entries()
    assert reader.last_seq == 3000


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("100000 100000\n", 1.0), ("150000 100000\n", 1.5), ("max 100000\n", None), ("garbage", None),
])
def test_a_cgroup_cpu_quota_caps_the_usable_cpus(tmp_path, monkeypatch, cpu_max, expected):
    """A container limited to one CPU (docker --cpus 1) still sees every host CPU in its
    affinity; its quota decides, so the helper does not compete with kvd for one CPU."""
    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(scan_ahead, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    monkeypatch.setattr(scan_ahead.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert scan_ahead.usable_cpus() == (4 if expected is None else expected)
    monkeypatch.setattr(scan_ahead, "CGROUP_CPU_MAX", tmp_path / "absent")
    assert scan_ahead.usable_cpus() == 4


def test_no_temp_directory_means_replaying_alone(tmp_path, helper_on, monkeypatch, caplog):
    """A read-only file system (no temp directory for the helper's results): replay alone."""
    write_segments(tmp_path / "data", mixed_records(1000), per_segment=1000)

    def read_only(prefix):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(scan_ahead.tempfile, "mkdtemp", read_only)
    reader = JournalReader(tmp_path / "data")
    assert read_all(reader) == list(range(1, 1001))
    assert "replay helper could not start" in caplog.text


def test_chunks_dropped_unread_leave_the_next_segments_chunks_to_the_reader(tmp_path, helper_on):
    """The reader stopped early in one segment: the helper, which would report that
    segment's chunks first, is stopped, and the next segment's chunks come back empty."""
    write_segments(tmp_path, puts(600), per_segment=300)
    first, second = sorted(tmp_path.iterdir())
    ahead = scan_ahead.ScanAhead([scan_ahead.Chunk(first, 0, 4096), scan_ahead.Chunk(first, 4096, 8192),
                                  scan_ahead.Chunk(second, 0, 4096)])
    try:
        [(chunk, scan)] = list(itertools.islice(ahead.scans(first), 1))
        assert scan is not None and scan.begin == 0
        ahead.drop(first)
        assert [(chunk.path, scan) for chunk, scan in ahead.scans(second)] == [(second, None)]
    finally:
        ahead.close()


def test_a_helper_whose_server_is_gone_removes_its_results_and_exits(tmp_path, helper_on):
    """kvd killed mid-replay: the helper finds its pipe closed at its next report."""
    write_segments(tmp_path, puts(2000), per_segment=2000)
    (path,) = sorted(tmp_path.iterdir())
    size = path.stat().st_size
    ahead = scan_ahead.ScanAhead([scan_ahead.Chunk(path, start, min(start + 8192, size))
                                  for start in range(0, size, 8192)])
    process, results = ahead._process, ahead._results
    assert process is not None and results is not None
    process.stdout.close()  # what the server's death does to the pipe
    assert process.wait(timeout=30) == 0
    assert not results.exists()
    ahead._process = None
    ahead.close()


def test_results_of_servers_no_longer_running_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_ahead.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"kvd-replay-{dead.pid}-abc"
    live = tmp_path / f"kvd-replay-{os.getpid()}-def"
    other = tmp_path / "kvd-replay-notapid-x"
    for path in (stale, live, other):
        path.mkdir()
        (path / "0.pickle").write_bytes(b"x")
    scan_ahead._remove_stale_results()
    assert not stale.exists() and live.exists() and other.exists()
