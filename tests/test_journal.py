"""The journal: record format, chain checks, group commit, durability before visibility,
and what a failed write or fsync does. Fault injection here replaces ``os`` calls
inside the journal thread; killing real processes is in test_durability.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading

import pytest

from kvd.errors import Unavailable
from kvd.log import file as file_journal
from kvd.log.format import GENESIS_HASH, RecordError, decode_record, encode_record, segment_name
from kvd.log.reader import JournalCorrupt, JournalReader
from kvd.model import Change


def write_records(directory, count: int) -> list[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    lines, prev = [], GENESIS_HASH
    for seq in range(1, count + 1):
        line, prev = encode_record(
            seq=seq, ts="2026-11-27T00:00:00.000000Z", op="put", prev=prev,
            set_values={f"k{seq}": json.dumps({"n": seq}, separators=(",", ":")).encode()},
        )
        lines.append(line)
    (directory / segment_name(1)).write_bytes(b"".join(lines))
    return lines


def read_all(directory) -> tuple[list[int], JournalReader]:
    reader = JournalReader(directory)
    return [record.seq for record in reader.records()], reader


# --- format ----------------------------------------------------------------------


def test_record_hash_covers_the_line_before_the_hash_field():
    line, digest = encode_record(seq=1, ts="2026-11-27T18:38:34.123456Z", op="put",
                                 prev=GENESIS_HASH, set_values={"a": b"[1,2]"})
    hashed = line[: line.index(b',"hash":"')]
    assert hashlib.sha256(hashed).hexdigest() == digest
    fields = json.loads(line)
    assert list(fields) == ["v", "seq", "ts", "op", "set", "prev", "hash"]
    assert fields["set"] == {"a": [1, 2]} and fields["hash"] == digest
    record = decode_record(line)
    assert record.set == {"a": b"[1,2]"} and record.seq == 1


def test_decode_rejects_an_edited_value():
    line, _ = encode_record(seq=1, ts="t", op="put", prev=GENESIS_HASH, set_values={"a": b"1"})
    with pytest.raises(RecordError, match="checksum"):
        decode_record(line.replace(b'"a":1', b'"a":2'))


def test_expiry_times_are_absolute_iso_utc():
    line, _ = encode_record(seq=1, ts="t", op="put", prev=GENESIS_HASH,
                            set_values={"a": b"1"}, expires={"a": 1795813136.5})
    assert json.loads(line)["expires"] == {"a": "2026-11-27T20:58:56.500000Z"}
    assert decode_record(line).expires == {"a": 1795813136.5}


# --- reader: tampering of each kind ----------------------------------------------


def test_reader_accepts_a_clean_chain(tmp_path):
    write_records(tmp_path, 5)
    seqs, reader = read_all(tmp_path)
    assert seqs == [1, 2, 3, 4, 5] and reader.torn_tail is None


@pytest.mark.parametrize("tamper", ["edit", "insert", "remove", "reorder", "rehash_edit"])
def test_reader_detects_tampering_before_the_end(tmp_path, tamper):
    lines = write_records(tmp_path, 5)
    if tamper == "edit":
        lines[2] = lines[2].replace(b'"n":3', b'"n":9')
    elif tamper == "insert":
        lines.insert(2, lines[1])
    elif tamper == "remove":
        del lines[2]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "rehash_edit":
        # An editor who recomputes the edited record's own hash still breaks the chain.
        body = lines[2][: lines[2].index(b',"hash":"')].replace(b'"n":3', b'"n":9')
        lines[2] = body + b',"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'
    (tmp_path / segment_name(1)).write_bytes(b"".join(lines))
    with pytest.raises(JournalCorrupt) as caught:
        read_all(tmp_path)
    assert caught.value.path.name == segment_name(1)
    assert caught.value.seq in (2, 3, 4)
    assert segment_name(1) in str(caught.value) and f"seq {caught.value.seq}" in str(caught.value)


def test_reader_reports_an_unterminated_last_record_as_torn(tmp_path):
    lines = write_records(tmp_path, 3)
    path = tmp_path / segment_name(1)
    path.write_bytes(b"".join(lines)[:-10])
    seqs, reader = read_all(tmp_path)
    assert seqs == [1, 2]
    assert reader.torn_tail is not None
    assert reader.torn_tail.offset == len(lines[0]) + len(lines[1])


def test_reader_reports_nul_padding_as_torn(tmp_path):
    lines = write_records(tmp_path, 2)
    (tmp_path / segment_name(1)).write_bytes(b"".join(lines) + b"\x00" * 4096)
    seqs, reader = read_all(tmp_path)
    assert seqs == [1, 2] and reader.torn_tail is not None


def test_reader_treats_a_complete_bad_last_record_as_corruption(tmp_path):
    lines = write_records(tmp_path, 3)
    lines[2] = lines[2].replace(b'"n":3', b'"n":4')
    (tmp_path / segment_name(1)).write_bytes(b"".join(lines))
    with pytest.raises(JournalCorrupt, match="seq 3"):
        read_all(tmp_path)


# --- the file journal in a running store -------------------------------------------


@pytest.mark.gen_test
async def test_group_commit_shares_one_fsync_among_concurrent_writes(harness, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(file_journal.os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    records = await asyncio.gather(*(
        harness.store.write(Change(op="put", set={f"k{i}": b"1"})) for i in range(50)
    ))
    assert sorted(record.seq for record in records) == list(range(1, 51))
    assert len(calls) < 10  # one write and fsync per loop pass, not per request
    assert harness.journal.stats.batched_records == 50


@pytest.mark.gen_test
async def test_the_next_batch_is_written_while_the_loop_is_busy(harness, monkeypatch):
    """A batch queued while another is being made durable goes to the journal thread at
    once: the thread writes it as soon as the first is durable, even while the loop is
    too busy to notice (under load, a whole pass of other connections' I/O)."""
    import time

    synced_at: list[float] = []
    first_in_fsync = threading.Event()
    release_first = threading.Event()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if not synced_at:
            first_in_fsync.set()
            release_first.wait(10)
        real(fd)
        synced_at.append(time.monotonic())

    monkeypatch.setattr(file_journal.os, "fdatasync", fdatasync)
    first = asyncio.ensure_future(harness.store.write(Change(op="put", set={"a": b"1"})))
    while not first_in_fsync.is_set():
        await asyncio.sleep(0.001)
    second = asyncio.ensure_future(harness.store.write(Change(op="put", set={"b": b"2"})))
    await asyncio.sleep(0.01)  # the second batch is handed over in this loop pass
    release_first.set()
    busy_from = time.monotonic()
    time.sleep(0.3)  # the loop is busy: it cannot see the first batch finish
    busy_until = time.monotonic()
    records = await asyncio.gather(first, second)
    assert [record.seq for record in records] == [1, 2]
    assert len(synced_at) == 2
    assert busy_from < synced_at[1] < busy_until  # written and synced while the loop was busy


@pytest.mark.gen_test
async def test_a_batch_chained_to_a_failed_one_is_not_written(harness, monkeypatch):
    """The first batch fails while the second is already on the journal thread: the second
    was chained to the first, so it is skipped, both answer 503, and the next write
    continues the chain from the last durable record."""
    await harness.store.write(Change(op="put", set={"keep": b"1"}))
    size_before = os.path.getsize(harness.journal._active_path)
    writing = threading.Event()
    fail_now = threading.Event()
    real_write = file_journal.os.write
    writes: list[bytes] = []

    def failing_write(fd: int, data) -> int:  # noqa: ANN001
        writes.append(bytes(data))
        writing.set()
        fail_now.wait(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_journal.os, "write", failing_write)
    first = asyncio.ensure_future(harness.store.write(Change(op="put", set={"a": b"1"})))
    while not writing.is_set():
        await asyncio.sleep(0.001)
    second = asyncio.ensure_future(harness.store.write(Change(op="put", set={"b": b"2"})))
    await asyncio.sleep(0.01)
    assert len(harness.journal._in_flight) == 2
    fail_now.set()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(result, Unavailable) for result in results), results
    assert len(writes) == 1  # the second batch never reached the file
    assert os.path.getsize(harness.journal._active_path) == size_before
    monkeypatch.setattr(file_journal.os, "write", real_write)
    record = await harness.store.write(Change(op="put", set={"c": b"3"}))
    assert record.seq == 2
    seqs, reader = read_all(harness.data_dir)
    assert seqs == [1, 2] and reader.torn_tail is None
    assert harness.store.get("a") is None and harness.store.get("b") is None


@pytest.mark.gen_test
async def test_write_is_invisible_until_durable(harness, monkeypatch):
    release = threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        release.wait(10)
        real(fd)

    monkeypatch.setattr(file_journal.os, "fdatasync", slow_fdatasync)
    pending = asyncio.ensure_future(harness.store.write(Change(op="put", set={"k": b"1"})))
    await asyncio.sleep(0.05)
    assert harness.store.get("k") is None  # written, not yet fsynced: not visible
    assert harness.store.current("k") is not None  # but writers already see it
    release.set()
    record = await pending
    assert harness.store.get("k").revision == record.seq == 1


@pytest.mark.gen_test
async def test_failed_write_answers_503_and_leaves_no_trace(harness, monkeypatch):
    await harness.store.write(Change(op="put", set={"keep": b"1"}))
    size_before = (harness.data_dir / segment_name(1)).stat().st_size
    real_write = os.write

    def failing_write(fd: int, data) -> int:  # noqa: ANN001
        real_write(fd, bytes(data[:7]))  # a partial write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_journal.os, "write", failing_write)
    results = await asyncio.gather(
        harness.store.write(Change(op="put", set={"a": b"1"})),
        harness.store.write(Change(op="delete", keys=("keep",))),
        return_exceptions=True,
    )
    assert all(isinstance(result, Unavailable) for result in results)
    assert (harness.data_dir / segment_name(1)).stat().st_size == size_before
    assert harness.store.get("a") is None and harness.store.current("a") is None
    assert harness.store.current("keep") is not None
    monkeypatch.setattr(file_journal.os, "write", real_write)
    record = await harness.store.write(Change(op="put", set={"b": b"2"}))
    assert record.seq == 2  # the failed writes consumed no sequence numbers
    assert harness.journal.writable
    seqs, _ = read_all(harness.data_dir)
    assert seqs == [1, 2]


@pytest.mark.gen_test
async def test_failed_fsync_refuses_writes_until_restart_but_serves_reads(
        harness, monkeypatch, http_client, base_url):
    await harness.store.write(Change(op="put", set={"keep": b"1"}))

    def failing_fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(file_journal.os, "fdatasync", failing_fdatasync)
    with pytest.raises(Unavailable):
        await harness.store.write(Change(op="put", set={"a": b"1"}))
    monkeypatch.undo()  # even with a healthy disk again, no retry: restart is required
    with pytest.raises(Unavailable, match="fsync failed"):
        await harness.store.write(Change(op="put", set={"b": b"1"}))
    assert not harness.journal.writable
    ready = await http_client.fetch(base_url + "/readyz", raise_error=False)
    assert ready.code == 503
    read = await http_client.fetch(base_url + "/keys/keep", raise_error=False)
    assert read.code == 200
    put = await http_client.fetch(base_url + "/keys", method="PUT", body=b'{"c":1}',
                                  headers={"Content-Type": "application/json"}, raise_error=False)
    assert put.code == 503 and json.loads(put.body)["error"]["code"] == "unavailable"


@pytest.mark.gen_test
async def test_a_full_disk_fails_writes_with_503_and_they_resume_when_space_returns(
        harness, monkeypatch, http_client, base_url):
    """ENOSPC part-way through a write: 503, no trace in memory or on disk, not ready-blocking."""
    await harness.store.write(Change(op="put", set={"keep": b"1"}))
    size_before = os.path.getsize(harness.journal._active_path)
    real_write = file_journal.os.write

    def disk_full(fd: int, data) -> int:  # noqa: ANN001
        real_write(fd, bytes(data[: len(data) // 2]))  # a partial write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_journal.os, "write", disk_full)
    for body in (b'{"a":1}', b'{"b":2}'):
        put = await http_client.fetch(base_url + "/keys", method="PUT", body=body,
                                      headers={"Content-Type": "application/json"}, raise_error=False)
        assert put.code == 503 and put.headers["Retry-After"] == "1"
        assert "No space left" in json.loads(put.body)["error"]["message"]
    assert os.path.getsize(harness.journal._active_path) == size_before  # cut back
    assert harness.journal.writable  # a failed write is not a failed fsync
    assert (await http_client.fetch(base_url + "/keys", raise_error=False)).body == b'{"keep":1}'
    assert (await http_client.fetch(base_url + "/readyz", raise_error=False)).code == 200

    monkeypatch.undo()  # space returns
    record = await harness.store.write(Change(op="put", set={"c": b"3"}))
    assert record.seq == 2  # the failed writes consumed no sequence number
    seqs, reader = read_all(harness.data_dir)
    assert seqs == [1, 2] and reader.torn_tail is None


@pytest.mark.gen_test
async def test_segments_roll_over_and_replay_across_them(tmp_path):
    from conftest import build_harness

    harness = build_harness(tmp_path / "d", **{"journal.segment_bytes": 4096})
    for i in range(40):
        await harness.store.write(Change(op="put", set={f"k{i}": b'"' + b"x" * 200 + b'"'}))
    harness.ctx.stop_periodic_tasks()
    await harness.journal.close()
    segments = sorted((tmp_path / "d").glob("[0-9]*.jsonl"))
    assert len(segments) > 2
    reopened = build_harness(tmp_path / "d")
    try:
        assert len(reopened.store) == 40 and reopened.journal.last_seq == 40
        record = await reopened.store.write(Change(op="put", set={"next": b"1"}))
        assert record.seq == 41
    finally:
        reopened.ctx.stop_periodic_tasks()
        reopened.journal.close_sync()


@pytest.mark.gen_test
async def test_a_segment_that_cannot_be_created_fails_the_write_and_the_roll_is_tried_again(
        tmp_path, monkeypatch):
    """No inode for the next segment (ENOSPC at creation): that write gets 503, the
    finished segment stays active, and writes resume when the disk has room again."""
    from conftest import build_harness

    harness = build_harness(tmp_path / "d", **{"journal.segment_bytes": 4096})
    real_open = file_journal.os.open

    def no_inodes(path, flags, *args):  # noqa: ANN001, ANN202
        if flags & os.O_CREAT and not os.path.exists(path):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, *args)

    try:
        big = b'"' + b"x" * 1000 + b'"'
        for i in range(4):
            await harness.store.write(Change(op="put", set={f"k{i}": big}))
        segments_before = sorted(p.name for p in (tmp_path / "d").glob("*.jsonl"))
        monkeypatch.setattr(file_journal.os, "open", no_inodes)
        for i in range(4, 7):  # each one needs the new segment
            with pytest.raises(Unavailable, match="No space left"):
                await harness.store.write(Change(op="put", set={f"k{i}": big}))
            assert harness.journal.writable and harness.journal.readiness_problem is None
        assert sorted(p.name for p in (tmp_path / "d").glob("*.jsonl")) == segments_before
        monkeypatch.undo()  # room again
        record = await harness.store.write(Change(op="put", set={"k4": big}))
        assert record.seq == 5  # the failed writes consumed no sequence number
        assert harness.journal._active_path.name == segment_name(5)
        assert harness.store.get("k4").value == big
    finally:
        harness.ctx.stop_periodic_tasks()
        harness.journal.close_sync()
    seqs, reader = read_all(tmp_path / "d")
    assert seqs == [1, 2, 3, 4, 5] and reader.torn_tail is None


@pytest.mark.gen_test
async def test_a_deleted_active_segment_refuses_writes_instead_of_losing_them(
        harness, http_client, base_url):
    """Records written to a file no longer in the data directory would be acknowledged and
    lost at the next start: the write that finds it so is refused, and so is every later one."""
    await harness.store.write(Change(op="put", set={"keep": b"1"}))
    os.unlink(harness.journal._active_path)  # an operator's rm, under the running server
    put = await http_client.fetch(base_url + "/keys/lost", method="PUT", body=b"1",
                                  headers={"Content-Type": "application/json"}, raise_error=False)
    assert put.code == 503 and "was deleted" in json.loads(put.body)["error"]["message"]
    assert "Retry-After" not in put.headers  # not a passing condition: a restart is needed
    ready = await http_client.fetch(base_url + "/readyz", raise_error=False)
    assert ready.code == 503 and "was deleted" in json.loads(ready.body)["error"]["message"]
    assert (await http_client.fetch(base_url + "/keys/lost", raise_error=False)).code == 404
    assert (await http_client.fetch(base_url + "/keys/keep", raise_error=False)).code == 200
    with pytest.raises(Unavailable, match="was deleted"):
        await harness.store.write(Change(op="put", set={"b": b"1"}))


@pytest.mark.gen_test
async def test_delete_of_a_key_whose_put_is_still_in_flight_succeeds(harness):
    put = harness.store.write(Change(op="put", set={"k": b"1"}))
    delete = harness.store.write(Change(op="delete", keys=("k",)))
    first, second = await asyncio.gather(put, delete)
    assert (first.seq, second.seq) == (1, 2)
    assert harness.store.get("k") is None and harness.store.current("k") is None


@pytest.mark.gen_test
async def test_a_record_the_store_cannot_apply_stops_writes_but_not_the_journal(harness, monkeypatch):
    await harness.store.write(Change(op="put", set={"keep": b"1"}))
    real_apply = harness.journal.on_commit

    def broken_apply(record):  # noqa: ANN001, ANN202
        raise RuntimeError("a bug in apply")

    monkeypatch.setattr(harness.journal, "on_commit", broken_apply)
    with pytest.raises(Unavailable):
        await harness.store.write(Change(op="put", set={"a": b"1"}))
    monkeypatch.setattr(harness.journal, "on_commit", real_apply)
    with pytest.raises(Unavailable, match="restart"):
        await harness.store.write(Change(op="put", set={"b": b"1"}))  # refused, not hung
    assert not harness.journal.writable
    assert harness.store.get("keep") is not None  # reads still served
    seqs, _ = read_all(harness.data_dir)
    assert seqs == [1, 2]  # the record is durable: a restart applies it


def test_a_complete_last_record_with_a_damaged_newline_is_damage_not_a_torn_tail(tmp_path):
    """A torn write leaves a prefix; a whole record followed by a wrong byte was acknowledged."""
    directory = tmp_path / "d"
    directory.mkdir()
    first, digest = encode_record(seq=1, ts="2026-11-27T00:00:00.000000Z", op="put",
                                  prev=GENESIS_HASH, set_values={"a": b"1"})
    second, _ = encode_record(seq=2, ts="2026-11-27T00:00:01.000000Z", op="put",
                              prev=digest, set_values={"b": b"2"})
    segment = directory / segment_name(1)
    for bad_byte in (b"\x0b", b"\x00", b"}"):
        segment.write_bytes(first + second[:-1] + bad_byte)
        with pytest.raises(JournalCorrupt, match="seq 2"):
            read_all(directory)
    segment.write_bytes(first + second[:-1])  # the newline never written: torn, never acknowledged
    seqs, reader = read_all(directory)
    assert seqs == [1] and reader.torn_tail is not None
