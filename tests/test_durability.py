"""Durability against real crashes: SIGKILL, torn tails, damage, locks, SIGTERM, disk limits.

Every server is a real ``kvd serve`` subprocess on 127.0.0.1 and port 0 (or,
for the byte-by-byte torn-tail sweep, the in-process store replayed exactly as
``kvd serve`` replays it). The journal is checked with an independent reader
written here, so a bug shared by kvd's reader and writer cannot hide itself.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import LISTENING, KvdProcess, Response, build_harness

from kvd.log.format import GENESIS_HASH, encode_record, segment_name
from kvd.log.reader import JournalCorrupt, JournalReader

HASH_FIELD = b',"hash":"'
JSON = {"Content-Type": "application/json"}


# --- an independent journal check ------------------------------------------------


def read_chain(data_dir: Path) -> list[dict[str, Any]]:
    """Every record of every segment, asserting the format and the chain on the way.

    Each segment ends in a newline, is named after its first seq, and each
    line's sha256 over the bytes before ``,"hash":"`` equals its hash; seq runs
    1..N without a gap and each ``prev`` is the hash of the record before.
    """
    records: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for path in sorted(data_dir.glob("[0-9]*.jsonl")):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends in a partial record"
        lines = data.splitlines(keepends=True)
        if lines:
            assert path.name == segment_name(len(records) + 1), "segment not named by first seq"
        for line in lines:
            assert b"\x00" not in line, f"NUL bytes in {path.name}"
            fields = json.loads(line)
            cut = line.rindex(HASH_FIELD)
            assert fields["seq"] == len(records) + 1, f"seq gap in {path.name}: {fields['seq']}"
            assert fields["prev"] == prev, f"chain broken at seq {fields['seq']}"
            assert hashlib.sha256(line[:cut]).hexdigest() == fields["hash"], (
                f"bad hash at seq {fields['seq']}"
            )
            prev = fields["hash"]
            records.append(fields)
    return records


def journal_files(data_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(data_dir.glob("[0-9]*.jsonl"))}


def store_state(harness: Any) -> dict[str, Any]:
    """What the in-process store holds, as parsed JSON."""
    return {
        key: json.loads(value)
        for batch in harness.store.scan()
        for key, value in batch
    }


def open_in_process(data_dir: Path) -> tuple[dict[str, Any], int]:
    """Replay ``data_dir`` as ``kvd serve`` does; returns (state, last seq) and closes it."""
    harness = build_harness(data_dir)
    try:
        return store_state(harness), harness.journal.last_seq
    finally:
        harness.ctx.stop_periodic_tasks()
        harness.journal.close_sync()


def kvd_command(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kvd", "serve", "--port", "0", "--host", "127.0.0.1",
            "--data-dir", str(data_dir), *args]


def kvd_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop("KVD_SERVER_PORT", None)
    return env


def run_until_exit(data_dir: Path, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run a server that is expected to refuse to start; killed if it outlives ``timeout``."""
    return subprocess.run(
        kvd_command(data_dir, *args), capture_output=True, text=True, timeout=timeout,
        cwd=data_dir.parent, env=kvd_env(),
    )


def error_code(response: Response) -> str:
    assert response.headers.get("Content-Type", "").startswith("application/json"), response
    return response.json()["error"]["code"]


# --- a small journal written by a real server ----------------------------------


@dataclass
class SampleJournal:
    data_dir: Path
    segment: Path
    content: bytes
    line_starts: list[int]  # offset of each record, plus len(content) at the end
    states: list[dict[str, Any]]  # states[n] = GET /keys after revision n

    def record(self, seq: int) -> bytes:
        return self.content[self.line_starts[seq - 1] : self.line_starts[seq]]


def write_sample_journal(kvd_process: Any, data_dir: Path) -> SampleJournal:
    """Four records through a real server, the last a multi-key batch; stopped by SIGTERM."""
    server = kvd_process(data_dir=data_dir)
    states: list[dict[str, Any]] = [{}]
    assert server.request("PUT", "/keys", {"alpha": 1}).json()["revision"] == 1
    states.append(server.request("GET", "/keys").json())
    assert server.request(
        "PUT", "/keys", {"beta": {"nested": [1, 2, 3]}, "gamma": "plain value text"}
    ).json()["revision"] == 2
    states.append(server.request("GET", "/keys").json())
    assert server.request("DELETE", "/keys/alpha").status == 204
    states.append(server.request("GET", "/keys").json())
    last = {"delta": "é ünïcode ☃", "epsilon": None, "zeta": [True, False], "beta": "overwritten"}
    assert server.request("PUT", "/keys", last).json() == {
        "revision": 4, "stored": list(last)
    }
    states.append(server.request("GET", "/keys").json())
    assert server.kill(signal.SIGTERM) == 0, server.log()
    segment = data_dir / segment_name(1)
    content = segment.read_bytes()
    starts = [0]
    for line in content.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    assert len(starts) == 5 and [r["seq"] for r in read_chain(data_dir)] == [1, 2, 3, 4]
    assert states[4] == {
        "beta": "overwritten", "delta": "é ünïcode ☃", "epsilon": None,
        "gamma": "plain value text", "zeta": [True, False],
    }
    return SampleJournal(data_dir, segment, content, starts, states)


def copy_with(tmp_path: Path, name: str, content: bytes) -> Path:
    """A fresh data dir holding one segment with ``content``."""
    data_dir = tmp_path / name / "data"
    data_dir.mkdir(parents=True)
    (data_dir / segment_name(1)).write_bytes(content)
    return data_dir


# --- 1. SIGKILL under concurrent writers -----------------------------------------


ABSENT = "<absent>"  # a key's state after an acknowledged delete (values are dicts)


@dataclass
class Writer:
    """One client thread: sequential writes to its own keys, remembering what was acknowledged."""

    port: int
    number: int
    killed: threading.Event
    deadline: float
    keys: list[str] = field(default_factory=list)
    acked: dict[str, Any] = field(default_factory=dict)  # key -> latest acknowledged state
    acked_puts: dict[int, dict[str, Any]] = field(default_factory=dict)  # revision -> batch
    acked_deletes: int = 0
    in_flight: dict[str, Any] | None = None  # the one write without an answer, if any
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = [f"w{self.number}/key {index}" for index in range(12)]

    def run(self) -> None:
        rng = random.Random(self.number)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        counter = 0
        try:
            while time.monotonic() < self.deadline:
                counter += 1
                live = [key for key, state in self.acked.items() if state != ABSENT]
                roll = rng.random()
                if live and roll < 0.2:
                    key = rng.choice(live)
                    intended: dict[str, Any] = {key: ABSENT}
                    method, path, body = "DELETE", "/keys/" + quote(key, safe=""), None
                else:
                    size = 1 if roll < 0.6 else rng.randint(2, 6)
                    intended = {
                        key: {"writer": self.number, "n": counter, "pad": "x" * rng.randint(0, 300)}
                        for key in rng.sample(self.keys, size)
                    }
                    method, path, body = "PUT", "/keys", json.dumps(intended).encode()
                    if size == 1 and roll < 0.4:  # the one-key route (kvd's fast write path)
                        (key, value), = intended.items()
                        path, body = "/keys/" + quote(key, safe=""), json.dumps(value).encode()
                self.in_flight = intended
                try:
                    connection.request(method, path, body=body, headers=JSON if body else {})
                    response = connection.getresponse()
                    payload = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    if not self.killed.is_set():
                        self.errors.append(f"{method} failed before the kill: {exc!r}")
                    return  # the answer never came: in_flight may or may not have committed
                if response.status not in (200, 201, 204):
                    self.errors.append(f"{method} {path} -> {response.status} {payload[:200]!r}")
                    return
                if method == "PUT" and path != "/keys":
                    if json.loads(payload) != intended:
                        self.errors.append(f"PUT {path} answered {payload[:200]!r}")
                    self.acked_puts[int(response.getheader("ETag").strip('"'))] = intended
                elif method == "PUT":
                    answer = json.loads(payload)
                    if answer["stored"] != list(intended):
                        self.errors.append(f"stored {answer['stored']}, sent {list(intended)}")
                    self.acked_puts[answer["revision"]] = intended
                else:
                    self.acked_deletes += 1
                self.acked.update(intended)
                self.in_flight = None
            self.errors.append("still running at the deadline: the kill did not stop it")
        finally:
            connection.close()


def brief(*states: Any) -> str:
    """A state as the write that made it (values carry a long pad)."""
    return ", ".join(state if state == ABSENT else f"write n={state['n']}" for state in states)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fsync", "segment_bytes"),
    [("always", None), ("everysec", None), ("no", None), ("always", 4096)],
    ids=["always", "everysec", "no", "always-rolling-4k-segments"],
)
def test_sigkill_under_concurrent_writers_loses_no_acknowledged_write(
    kvd_process, tmp_path, fsync, segment_bytes
):
    data_dir = tmp_path / "data"
    env = {"KVD_JOURNAL_SEGMENT_BYTES": str(segment_bytes)} if segment_bytes else {}
    server = kvd_process(data_dir=data_dir, args=["--fsync", fsync], env=env)
    killed = threading.Event()
    writers = [Writer(server.port, number, killed, time.monotonic() + 8.0) for number in range(8)]
    threads = [threading.Thread(target=writer.run, daemon=True) for writer in writers]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    killed.set()
    assert server.kill(signal.SIGKILL) == -signal.SIGKILL
    for thread in threads:
        thread.join(timeout=15)
    assert not any(thread.is_alive() for thread in threads)
    assert [error for writer in writers for error in writer.errors] == []
    acked_ops = sum(len(w.acked_puts) + w.acked_deletes for w in writers)
    assert acked_ops >= 50, "too few writes to mean anything"
    assert sum(w.acked_deletes for w in writers) > 0

    restarted = kvd_process(data_dir=data_dir, args=["--fsync", fsync], env=env)
    listing = restarted.request("GET", "/keys").json()
    full = dict(listing)
    for writer in writers:
        in_flight = writer.in_flight or {}
        for key in writer.keys:
            actual = listing.pop(key, ABSENT)
            allowed = [writer.acked.get(key, ABSENT)]
            if key in in_flight:
                allowed.append(in_flight[key])
            assert actual in allowed, f"{key!r}: found {brief(actual)}, allowed {brief(*allowed)}"
        # An in-flight batch is atomic: all of it or none of it.
        applied = {key: full.get(key, ABSENT) == value for key, value in in_flight.items()}
        assert len(set(applied.values())) <= 1, f"in-flight batch half applied: {applied}"
    assert listing == {}, f"keys nobody wrote: {sorted(listing)[:5]}"

    records = read_chain(data_dir)
    in_flight_ops = sum(1 for w in writers if w.in_flight)
    assert acked_ops <= len(records) <= acked_ops + in_flight_ops
    for writer in writers:
        for revision, batch in writer.acked_puts.items():
            assert records[revision - 1]["op"] == "put"
            assert records[revision - 1]["set"] == batch, f"revision {revision} holds another write"
    if segment_bytes:
        assert len(list(data_dir.glob("[0-9]*.jsonl"))) > 10, "segments never rolled"
    ready = restarted.request("GET", "/readyz")
    assert ready.status == 200 and ready.json()["revision"] == len(records)
    # Numbering goes on from the recovered end, chained to it.
    assert restarted.request("PUT", "/keys", {"after": 1}).json()["revision"] == len(records) + 1
    assert [r["seq"] for r in read_chain(data_dir)] == list(range(1, len(records) + 2))


# --- 2. torn tail ----------------------------------------------------------------


@pytest.mark.slow
def test_torn_last_record_is_cut_back_at_every_byte_offset(kvd_process, tmp_path, caplog):
    sample = write_sample_journal(kvd_process, tmp_path / "written")
    last_start = sample.line_starts[3]
    good = sample.content[:last_start]
    assert len(sample.content) - last_start > 100  # the batch is a long record
    for offset in range(last_start, len(sample.content)):
        data_dir = copy_with(tmp_path, f"cut-{offset}", sample.content[:offset])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvd.journal"):
            state, last_seq = open_in_process(data_dir)
        assert state == sample.states[3], f"cut at {offset}"
        assert last_seq == 3, f"cut at {offset}"
        assert journal_files(data_dir) == {segment_name(1): good}, f"cut at {offset}"
        torn = offset > last_start
        assert any("torn" in r.getMessage() for r in caplog.records) == torn, f"cut at {offset}"


@pytest.mark.slow
def test_torn_last_record_is_cut_by_a_real_server_at_first_middle_and_last_offsets(
    kvd_process, tmp_path
):
    sample = write_sample_journal(kvd_process, tmp_path / "written")
    last_start, end = sample.line_starts[3], sample.line_starts[4]
    good = sample.content[:last_start]
    for offset in (last_start + 1, (last_start + end) // 2, end - 1):
        data_dir = copy_with(tmp_path, f"cut-{offset}", sample.content[:offset])
        server = kvd_process(data_dir=data_dir)
        assert server.request("GET", "/keys").json() == sample.states[3], f"cut at {offset}"
        assert "torn" in server.log(), f"cut at {offset}: no warning"
        assert journal_files(data_dir) == {segment_name(1): good}, f"cut at {offset}"
        assert server.request("PUT", "/keys", {"next": offset}).json()["revision"] == 4
        records = read_chain(data_dir)
        assert [r["seq"] for r in records] == [1, 2, 3, 4] and records[3]["set"] == {"next": offset}
        assert server.kill(signal.SIGTERM) == 0


@pytest.mark.slow
def test_missing_final_newline_drops_the_unterminated_last_record(kvd_process, tmp_path):
    sample = write_sample_journal(kvd_process, tmp_path / "written")
    assert sample.content.endswith(b"}\n")
    data_dir = copy_with(tmp_path, "no-newline", sample.content[:-1])
    server = kvd_process(data_dir=data_dir)
    assert server.request("GET", "/keys").json() == sample.states[3]
    assert server.request("GET", "/keys/delta").status == 404
    assert "torn" in server.log()
    assert journal_files(data_dir) == {segment_name(1): sample.content[: sample.line_starts[3]]}


@pytest.mark.slow
def test_nul_padding_after_the_last_record_is_cut(kvd_process, tmp_path):
    sample = write_sample_journal(kvd_process, tmp_path / "written")
    padded = sample.content + b"\x00" * 4096
    state, last_seq = open_in_process(copy_with(tmp_path, "in-process", padded))
    assert (state, last_seq) == (sample.states[4], 4)
    assert journal_files(tmp_path / "in-process" / "data") == {segment_name(1): sample.content}

    data_dir = copy_with(tmp_path, "served", padded)
    server = kvd_process(data_dir=data_dir)
    assert server.request("GET", "/keys").json() == sample.states[4]
    assert journal_files(data_dir) == {segment_name(1): sample.content}
    assert server.request("PUT", "/keys", {"next": 1}).json()["revision"] == 5
    assert [r["seq"] for r in read_chain(data_dir)] == [1, 2, 3, 4, 5]


def test_torn_record_followed_by_nul_padding_is_cut(tmp_path):
    lines = []
    prev = GENESIS_HASH
    for seq in (1, 2):
        line, prev = encode_record(seq=seq, ts="2026-11-27T00:00:00.000000Z", op="put",
                                   prev=prev, set_values={f"k{seq}": b'"v"'})
        lines.append(line)
    content = lines[0] + lines[1][:40] + b"\x00" * 512
    data_dir = copy_with(tmp_path, "padded", content)
    assert open_in_process(data_dir) == ({"k1": "v"}, 1)
    assert journal_files(data_dir) == {segment_name(1): lines[0]}


def two_records() -> list[bytes]:
    lines, prev = [], GENESIS_HASH
    for seq in (1, 2):
        line, prev = encode_record(seq=seq, ts="2026-11-27T00:00:00.000000Z", op="put",
                                   prev=prev, set_values={f"k{seq}": b'"value"'})
        lines.append(line)
    return lines


@pytest.mark.parametrize("tail", [
    pytest.param(lambda last: last.replace(b'"value"', b'"VALUE"')[:-1], id="edited-whole-record-no-newline"),
    pytest.param(lambda last: last.replace(b'"value"', b'"VALUE"')[:-1] + b"X", id="edited-record-stray-byte"),
    pytest.param(lambda last: b"garbage", id="bytes-that-begin-no-record"),
    pytest.param(lambda last: b'[{"v":1,"seq":2', id="a-fragment-that-is-no-record-prefix"),
])
def test_an_unterminated_tail_that_no_write_leaves_is_damage_not_cut(tmp_path, tail):
    """A torn write leaves a prefix of a record. A whole record failing its checksum, or
    bytes that begin no record, are damage to acknowledged data: start-up must stop
    (the operator's repair quarantines them), not cut them with a warning."""
    first, last = two_records()
    content = first + tail(last)
    data_dir = copy_with(tmp_path, "damaged", content)
    with pytest.raises(JournalCorrupt) as refused:
        open_in_process(data_dir)
    assert refused.value.seq == 2 and refused.value.offset == len(first)
    assert journal_files(data_dir) == {segment_name(1): content}  # nothing cut


@pytest.mark.parametrize("gap", [b"\n", b"\n\n", b"\x00" * 10 + b"\n"])
def test_an_empty_line_or_nul_bytes_before_more_records_is_named_as_such(tmp_path, gap):
    """Not 'unterminated record': every line around it is whole."""
    first, last = two_records()
    data_dir = copy_with(tmp_path, "gap", first + gap + last)
    with pytest.raises(JournalCorrupt, match="empty line or NUL bytes before more records") as refused:
        open_in_process(data_dir)
    assert refused.value.seq == 2 and refused.value.offset == len(first)


@pytest.mark.parametrize("cut", [1, 5, 40, -2, -1])
def test_a_prefix_of_the_last_record_is_still_a_torn_tail(tmp_path, cut):
    first, last = two_records()
    data_dir = copy_with(tmp_path, f"torn{cut}", first + last[:cut])  # -1: all but the newline
    assert open_in_process(data_dir) == ({"k1": "value"}, 1)
    assert journal_files(data_dir) == {segment_name(1): first}


# --- 3. damage before the end ----------------------------------------------------


def flip_byte_in_value(sample: SampleJournal) -> tuple[bytes, int]:
    at = sample.content.index(b"plain value text")
    assert sample.line_starts[1] < at < sample.line_starts[2]  # inside record 2
    damaged = bytearray(sample.content)
    damaged[at] = ord("P")
    return bytes(damaged), 2


def delete_middle_line(sample: SampleJournal) -> tuple[bytes, int]:
    return sample.record(1) + sample.record(3) + sample.record(4), 2


def swap_two_lines(sample: SampleJournal) -> tuple[bytes, int]:
    return sample.record(1) + sample.record(3) + sample.record(2) + sample.record(4), 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", [flip_byte_in_value, delete_middle_line, swap_two_lines],
    ids=["flipped-byte", "deleted-line", "swapped-lines"],
)
def test_damage_before_the_end_refuses_start_up_and_leaves_the_file_unchanged(
    kvd_process, tmp_path, damage
):
    sample = write_sample_journal(kvd_process, tmp_path / "written")
    content, bad_seq = damage(sample)
    data_dir = copy_with(tmp_path, "damaged", content)
    finished = run_until_exit(data_dir)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 1, output
    assert segment_name(1) in output, output
    assert re.search(rf"\bseq {bad_seq}\b", output), output
    assert f"at byte {sample.line_starts[bad_seq - 1]}" in output, output
    assert "Traceback" not in output
    assert journal_files(data_dir) == {segment_name(1): content}  # bytes identical, no new files


@pytest.mark.slow
def test_torn_tail_in_an_earlier_segment_refuses_start_up(kvd_process, tmp_path):
    data_dir = tmp_path / "data"
    server = kvd_process(data_dir=data_dir, env={"KVD_JOURNAL_SEGMENT_BYTES": "4096"})
    for index in range(10):
        assert server.request("PUT", "/keys", {f"k{index}": "v" * 1500}).status == 200
    assert server.kill(signal.SIGTERM) == 0
    segments = sorted(data_dir.glob("[0-9]*.jsonl"))
    assert len(segments) >= 3
    first = segments[0].read_bytes()
    segments[0].write_bytes(first[:-10])  # unterminated, but not in the last segment
    before = journal_files(data_dir)
    finished = run_until_exit(data_dir, timeout=15)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 1, output
    assert segments[0].name in output, output
    assert journal_files(data_dir) == before


# --- 4. one server per data dir ---------------------------------------------------


@pytest.mark.slow
def test_second_server_on_same_data_dir_refuses_to_start(kvd_process, tmp_path):
    data_dir = tmp_path / "data"
    first = kvd_process(data_dir=data_dir)
    assert first.request("PUT", "/keys", {"a": 1}).json()["revision"] == 1
    before = journal_files(data_dir)

    second = run_until_exit(data_dir)
    output = second.stdout + second.stderr
    assert second.returncode == 1, output
    assert str(data_dir) in output, output
    assert not LISTENING.search(output.encode()), "the second server opened a port"

    assert journal_files(data_dir) == before
    assert (data_dir / "LOCK").read_text().strip() == str(first.process.pid)
    assert first.process.poll() is None
    assert first.request("GET", "/keys/a").json() == {"a": 1}
    assert first.request("PUT", "/keys", {"b": 2}).json()["revision"] == 2
    assert first.request("GET", "/readyz").status == 200


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["always", "no"])
def test_a_data_dir_deleted_under_the_server_refuses_writes(kvd_process, tmp_path, fsync):
    """``rm -rf data`` under a running server: its next write is refused (not acknowledged
    and then lost), /readyz says why, and reads of what it holds go on."""
    import shutil

    data_dir = tmp_path / "data"
    server = kvd_process(data_dir=data_dir, env={"KVD_JOURNAL_FSYNC": fsync})
    assert server.request("PUT", "/keys", {"a": 1}).status == 200
    shutil.rmtree(data_dir)
    put = server.request("PUT", "/keys", {"b": 2})
    assert put.status == 503, put.body
    assert "was deleted" in put.json()["error"]["message"]
    ready = server.request("GET", "/readyz")
    assert ready.status == 503 and "was deleted" in ready.json()["error"]["message"]
    assert server.request("PUT", "/keys", {"c": 3}).status == 503  # until a restart
    assert server.get_key("a").json() == {"a": 1}
    assert server.get_key("b").status == 404
    assert "CRITICAL" in server.log() and "was deleted" in server.log()


# --- 5. SIGTERM ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_drains_and_exits_zero(kvd_process, tmp_path, signum):
    data_dir = tmp_path / "data"
    server = kvd_process(data_dir=data_dir)
    for index in range(5):
        assert server.request("PUT", "/keys", {f"pre-{index}": index}).json()["revision"] == index + 1
    batch = {f"big-{index:04d}": "v" * 1000 + str(index) for index in range(2000)}
    body = json.dumps(batch).encode()
    half = len(body) // 2

    # "Expect: 100-continue" makes the server answer "100 Continue" only once the
    # handler has prepared for the body, so the request is surely in flight
    # (counted by the drain) when SIGTERM lands, with half its body still to come.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.sendall(
        b"PUT /keys HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, "connection closed before 100 Continue"
        interim += chunk
    assert interim.startswith(b"HTTP/1.1 100"), interim
    sock.sendall(body[:half])
    server.process.send_signal(signum)
    time.sleep(0.5)
    assert server.process.poll() is None, "exited without draining:\n" + server.log()
    with pytest.raises(ConnectionRefusedError):
        server.request("GET", "/healthz", timeout=2)  # no longer accepting
    sock.sendall(body[half:])
    response = http.client.HTTPResponse(sock)
    response.begin()
    answer = json.loads(response.read())
    sock.close()
    assert response.status == 200, answer
    assert answer == {"revision": 6, "stored": list(batch)}
    assert server.process.wait(timeout=15) == 0, server.log()

    restarted = kvd_process(data_dir=data_dir)
    assert restarted.request("GET", "/keys").json() == {
        **{f"pre-{index}": index for index in range(5)}, **batch
    }
    assert [r["seq"] for r in read_chain(data_dir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("fast_wire", ["true", "false"], ids=["kvd's connections", "tornado's"])
def test_sigterm_finishes_a_plain_put_whose_body_is_still_coming(kvd_process, tmp_path, fast_wire):
    """The plainest write (PUT /keys/{id}, no Expect) with half its body sent when SIGTERM
    lands: it is in flight, so it is answered and kept, not cut off."""
    data_dir = tmp_path / "data"
    server = kvd_process(data_dir=data_dir, env={"KVD_SERVER_FAST_WIRE": fast_wire})
    body = json.dumps({"text": "v" * 20000}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.sendall(
        b"PUT /keys/uploading HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body[:100]
    )
    time.sleep(0.3)  # the head has arrived and been read
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.process.poll() is None, "exited without waiting for the upload:\n" + server.log()
    sock.sendall(body[100:])
    response = http.client.HTTPResponse(sock)
    response.begin()
    answer = json.loads(response.read())
    sock.close()
    assert response.status == 201, answer
    assert server.process.wait(timeout=15) == 0, server.log()
    assert "draining 1 in-flight requests" in server.log()
    restarted = kvd_process(data_dir=data_dir)
    assert restarted.request("GET", "/keys/uploading").json() == {"uploading": {"text": "v" * 20000}}


# --- 6. bad requests write nothing -------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_REQUESTS = [
    ("malformed JSON", "", b'{"a": ', JSON, 400, "bad_request"),
    ("non-object body", "", b"[1, 2]", JSON, 400, "bad_request"),
    ("empty object", "", b"{}", JSON, 400, "bad_request"),
    ("empty body", "", b"", JSON, 400, "bad_request"),
    ("control character in key", "", b'{"a\\u0001b": 1}', JSON, 400, "bad_request"),
    ("DEL in key", "", b'{"a\\u007fb": 1}', JSON, 400, "bad_request"),
    ("empty key", "", b'{"": 1}', JSON, 400, "bad_request"),
    ("key over 1024 bytes", "", json.dumps({"é" * 513: 1}).encode(), JSON, 400, "bad_request"),
    ("value over max", "", json.dumps({"big": "x" * (1 << 20)}).encode(), JSON, 413,
     "payload_too_large"),
    ("wrong content type", "", b'{"a": 1}', {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("form content type", "", b'{"a": 1}', {"Content-Type": "application/x-www-form-urlencoded"},
     415, "unsupported_media_type"),
    ("expire_in zero", "?expire_in=0", b'{"a": 1}', JSON, 400, "bad_request"),
    ("expire_in negative", "?expire_in=-1", b'{"a": 1}', JSON, 400, "bad_request"),
    ("expire_in text", "?expire_in=abc", b'{"a": 1}', JSON, 400, "bad_request"),
    ("expire_in nan", "?expire_in=nan", b'{"a": 1}', JSON, 400, "bad_request"),
    ("expire_in inf", "?expire_in=inf", b'{"a": 1}', JSON, 400, "bad_request"),
    ("expire_in over ten years", "?expire_in=315360001", b'{"a": 1}', JSON, 400, "bad_request"),
    ("NaN literal", "", b'{"a": NaN}', JSON, 400, "bad_request"),
    ("Infinity literal", "", b'{"a": -Infinity}', JSON, 400, "bad_request"),
    ("number out of range", "", b'{"a": 1e999}', JSON, 400, "bad_request"),
    ("nesting deeper than 128", "", b'{"a": ' + nested(129) + b"}", JSON, 400, "bad_request"),
    ("lone surrogate", "", b'{"a": "\\ud800"}', JSON, 400, "bad_request"),
    ("invalid UTF-8", "", b'{"a": "\xff"}', JSON, 400, "bad_request"),
]


@pytest.mark.slow
def test_bad_requests_leave_the_next_revision_unchanged(kvd_process, tmp_path):
    data_dir = tmp_path / "data"
    server = kvd_process(data_dir=data_dir)
    assert server.request("PUT", "/keys", {"keep": "one"}).json()["revision"] == 1
    revision = server.request("PUT", "/keys", {"keep": "two", "other": [1]}).json()["revision"]
    assert revision == 2
    before = journal_files(data_dir)

    for name, query, body, headers, status, code in BAD_REQUESTS:
        response = server.request("PUT", "/keys" + query, body=body, headers=dict(headers))
        assert response.status == status, f"{name}: {response.status} {response.body[:200]!r}"
        assert error_code(response) == code, name
        assert response.json()["error"]["message"], name
        assert journal_files(data_dir) == before, f"{name} wrote to the journal"

    assert server.request("GET", "/keys").json() == {"keep": "two", "other": [1]}
    assert server.request("GET", "/readyz").json()["revision"] == revision
    assert server.request("PUT", "/keys", {"good": True}).json()["revision"] == revision + 1
    records = read_chain(data_dir)
    assert len(records) == revision + 1 and records[-1]["set"] == {"good": True}


# --- 7. a write the disk refuses -------------------------------------------------


@pytest.fixture
def spawned() -> Any:
    """Processes a test starts itself; any still running are killed afterwards."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def start_with_file_size_limit(data_dir: Path, limit: int, spawned: list[Any]) -> KvdProcess:
    """``kvd serve`` under RLIMIT_FSIZE, wrapped in a KvdProcess for its request helpers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server = KvdProcess(data_dir)
    server.log_path = data_dir.parent / "limited.log"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with open(server.log_path, "wb") as log:
        server.process = subprocess.Popen(
            kvd_command(data_dir), stdout=log, stderr=subprocess.STDOUT, cwd=data_dir.parent,
            # no .pyc writes: one over the limit would meet SIGXFSZ before kvd ignores it
            env=kvd_env(PYTHONDONTWRITEBYTECODE="1"), preexec_fn=limit_file_size,
        )
    spawned.append(server.process)
    deadline = time.monotonic() + 30
    while not (match := LISTENING.search(server.log_path.read_bytes())):
        assert server.process.poll() is None, server.log()
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    server.port = int(match.group(2))
    server.wait_ready(20)
    return server


@pytest.mark.slow
def test_file_size_limit_answers_503_and_keeps_serving_reads(kvd_process, tmp_path, spawned):
    data_dir = tmp_path / "data"
    limit = 16 * 1024
    server = start_with_file_size_limit(data_dir, limit, spawned)
    acked: dict[str, str] = {}
    refused: list[str] = []
    for index in range(100):
        key, value = f"k{index:03d}", f"{index}-" + "v" * 900
        response = server.request("PUT", "/keys", {key: value})
        if response.status == 200:
            assert response.json()["revision"] == len(acked) + 1
            acked[key] = value
            continue
        assert response.status == 503, response
        assert error_code(response) == "unavailable"
        refused.append(key)
        if len(refused) == 3:
            break
    assert acked and len(refused) == 3, "the limit was never reached"

    # The refused writes left no trace in memory...
    for key in refused:
        assert server.get_key(key).status == 404
    assert server.request("GET", "/keys").json() == acked
    for key, value in acked.items():
        assert server.get_key(key).json() == {key: value}
    # ...nor on disk: every byte is a whole, verified record.
    segment = data_dir / segment_name(1)
    # The refused record did not fit: its write was partial, then cut back.
    assert segment.stat().st_size <= limit < segment.stat().st_size + 900
    records = read_chain(data_dir)
    assert [r["seq"] for r in records] == list(range(1, len(acked) + 1))
    reader = JournalReader(data_dir)
    assert len(list(reader.records())) == len(acked) and reader.torn_tail is None
    # A failed write is not a failed fsync: still ready, and a write that fits
    # takes the next seq, chained to the last good record.
    ready = server.request("GET", "/readyz")
    assert ready.status == 200 and ready.json()["revision"] == len(acked)
    assert limit - segment.stat().st_size > 300
    small = server.request("PUT", "/keys", {"small": 1})
    assert small.status == 200 and small.json()["revision"] == len(acked) + 1
    acked["small"] = 1
    assert [r["seq"] for r in read_chain(data_dir)] == list(range(1, len(acked) + 1))
    assert server.kill(signal.SIGTERM) == 0, server.log()

    restarted = kvd_process(data_dir=data_dir)
    assert restarted.request("GET", "/keys").json() == acked
    assert restarted.request("PUT", "/keys", {"after": 1}).json()["revision"] == len(acked) + 1


def test_read_chain_rejects_what_it_should(tmp_path):
    """The independent checker itself: it must notice a partial line and a broken chain."""
    one, digest = encode_record(seq=1, ts="2026-11-27T00:00:00.000000Z", op="put",
                                prev=GENESIS_HASH, set_values={"a": b"1"})
    two, _ = encode_record(seq=2, ts="2026-11-27T00:00:00.000000Z", op="put",
                           prev=GENESIS_HASH, set_values={"b": b"2"})
    assert [r["seq"] for r in read_chain(copy_with(tmp_path, "ok", one))] == [1]
    with pytest.raises(AssertionError, match="partial"):
        read_chain(copy_with(tmp_path, "partial", one + two[:-1]))
    with pytest.raises(AssertionError, match="chain"):
        read_chain(copy_with(tmp_path, "chain", one + two))
    assert digest != GENESIS_HASH
