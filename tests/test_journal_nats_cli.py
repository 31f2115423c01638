"""``kvd journal ... --nats URL --stream NAME``: the auditor commands on a NATS-backed store.

Streams are built by hand in a real nats-server, in the layout
``kvd/log/nats_stream.py`` defines: chained records (``encode_record``) in
messages of 1-3 records with ``Kvd-First-Seq``/``Kvd-Last-Seq``, snapshots
(``write_snapshot``) in the ``<stream>-snapshots`` bucket with their stream
sequence. Archive off is a stream purged up to its newest snapshot. The
commands run in process through ``kvd.cli.main``.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from natsserver import free_ports, nats_server  # noqa: F401
from tests_support import Ran

from kvd.audit import nats_source
from kvd.cli import main
from kvd.log import nats_stream
from kvd.log.format import (
    GENESIS_HASH,
    OP_CLEAR,
    OP_DELETE,
    OP_PUT,
    encode_record,
    format_ts,
    segment_name,
)
from kvd.log.snapshot import SnapshotHeader, snapshot_name, write_snapshot
from kvd.model import Entry

pytestmark = pytest.mark.nats

START = 1_800_000_000.0
KEYS = ("a", "b", "c", "d", "e")


# --- building a stream ---------------------------------------------------------------


@dataclass
class Built:
    """What was published: every record, the model after each seq, and where each record went."""

    stream: str
    lines: list[bytes] = field(default_factory=list)  # record seq n is lines[n - 1]
    hashes: list[str] = field(default_factory=lambda: [GENESIS_HASH])  # hashes[n]: record n's
    times: list[str] = field(default_factory=lambda: [""])
    states: list[dict[str, Entry]] = field(default_factory=lambda: [{}])  # after seq n
    changes: list[dict[str, Any]] = field(default_factory=list)  # (key, change) as history prints
    groups: list[tuple[int, int]] = field(default_factory=list)  # (first, last) seq per message
    stream_seq_of: dict[int, int] = field(default_factory=dict)  # record seq -> message
    snapshots: list[int] = field(default_factory=list)

    @property
    def last(self) -> int:
        return len(self.lines)

    def model(self, seq: int) -> dict[str, Any]:
        return {key: json.loads(entry.value) for key, entry in sorted(self.states[seq].items())}

    def history(self, key: str, after: int = 0) -> list[dict[str, Any]]:
        return [change for k, change in self.changes if k == key and change["seq"] > after]


def make_records(built: Built, count: int, seed: int, tamper: int | None = None) -> None:
    """Chained records: puts of one or two keys, deletes, one clear; ``tamper`` gets a bad hash."""
    rng = random.Random(seed)
    for seq in range(1, count + 1):
        state = dict(built.states[-1])
        ts = format_ts(START + seq)
        actor = ("alice", "bob")[seq % 2]
        present = sorted(state)
        if seq == count // 2:
            op, touched = OP_CLEAR, present
        elif present and rng.random() < 0.2:
            op, touched = OP_DELETE, [rng.choice(present)]
        else:
            op, touched = OP_PUT, sorted(rng.sample(KEYS, rng.choice((1, 2))))
        values = {key: json.dumps({"n": seq, "key": key}, separators=(",", ":")).encode() for key in touched}
        if op == OP_PUT:
            line, digest = encode_record(
                seq=seq, ts=ts, op=op, prev=built.hashes[-1], set_values=values, actor=actor
            )
            for key in touched:
                state[key] = Entry(values[key], seq)
        elif op == OP_DELETE:
            line, digest = encode_record(seq=seq, ts=ts, op=op, prev=built.hashes[-1], keys=touched, actor=actor)
            for key in touched:
                del state[key]
        else:
            line, digest = encode_record(seq=seq, ts=ts, op=op, prev=built.hashes[-1], actor=actor)
            state.clear()
        for key in touched:
            change: dict[str, Any] = {"seq": seq, "ts": ts, "op": op, "actor": actor}
            if op == OP_PUT:
                change["value"] = json.loads(values[key])
            built.changes.append((key, change))
        if seq == tamper:
            # Same length, different bytes: the stored hash no longer matches the line.
            line = line.replace(f'"actor":"{actor}"'.encode(), f'"actor":"{actor.upper()}"'.encode(), 1)
        built.lines.append(line)
        built.hashes.append(digest)  # the chain goes on from the true hash: only `tamper` is bad
        built.times.append(ts)
        built.states.append(state)


def group(built: Built, seed: int) -> None:
    rng = random.Random(seed)
    seq = 1
    while seq <= built.last:
        last = min(built.last, seq + rng.choice((0, 1, 2)))
        built.groups.append((seq, last))
        seq = last + 1


def mid_message_seq(built: Built, near: int) -> int:
    """A seq near ``near`` that is not the last record of its message (the snapshot splits it)."""
    for first, last in built.groups:
        if last > first and first >= near:
            return first
    raise AssertionError("no message of two or more records")


def message_end_seq(built: Built, near: int) -> int:
    for _first, last in built.groups:
        if last >= near:
            return last
    raise AssertionError("no message")


async def publish(url: str, built: Built, snapshots: list[int], tmp: Path, *, purge: str | None) -> None:
    """Publish every message, upload snapshots at ``snapshots``, purge up to the newest if asked."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await nats_stream.ensure_stream(js, built.stream, 1)
        for first, last in built.groups:
            ack = await js.publish(
                nats_stream.subject(built.stream), b"".join(built.lines[first - 1 : last]),
                stream=built.stream,
                headers={nats_stream.FIRST_SEQ_HEADER: str(first), nats_stream.LAST_SEQ_HEADER: str(last)},
            )
            for seq in range(first, last + 1):
                built.stream_seq_of[seq] = ack.seq
        if snapshots:
            store = await nats_stream.ensure_bucket(js, built.stream, 1)
            for seq in snapshots:
                directory = tmp / f"snap-{built.stream}-{seq}"
                directory.mkdir()
                state = built.states[seq]
                path = write_snapshot(
                    directory, SnapshotHeader(seq, built.times[seq], built.hashes[seq], len(state)),
                    sorted(state.items()),
                )
                await nats_stream.upload_snapshot(store, path, built.stream_seq_of[seq])
            built.snapshots = list(snapshots)
        if purge == "front":  # the first three messages, whatever the snapshots
            await js.purge_stream(built.stream, seq=4)
        elif purge:  # "after": up to and with the newest snapshot's message; "keep": without it
            message = built.stream_seq_of[snapshots[-1]]
            await js.purge_stream(built.stream, seq=message + 1 if purge == "after" else message)
    finally:
        await client.close()


def build(url: str, tmp: Path, stream: str, *, count: int = 60, seed: int = 1,
          snapshots: str = "mid", purge: str | None = None, tamper: int | None = None) -> Built:
    built = Built(stream)
    make_records(built, count, seed, tamper)
    group(built, seed)
    if snapshots == "mid":  # two, each splitting a message (archive on)
        at = [mid_message_seq(built, count // 4), mid_message_seq(built, (2 * count) // 3)]
    elif snapshots == "mid1":  # one, splitting a message
        at = [mid_message_seq(built, (2 * count) // 3)]
    elif snapshots == "last":  # one, at the last record: nothing after it
        at = [count]
    elif snapshots == "end":  # one, at the end of a message (so the purge keeps every later record)
        at = [message_end_seq(built, (2 * count) // 3)]
    else:
        at = []
    asyncio.run(publish(url, built, at, tmp, purge=purge))
    return built


# --- running commands ----------------------------------------------------------------


@pytest.fixture
def journal(capsysbinary, nats_server):  # noqa: ANN001, ANN201, F811
    """``journal(action, stream, *args)`` runs ``kvd journal ACTION --nats URL --stream STREAM``."""

    def run(action: str, stream: str | None, *args: str) -> Ran:
        where = ["--nats", nats_server.url] + (["--stream", stream] if stream else [])
        code = main(["journal", action, *where, *args])
        out, err = capsysbinary.readouterr()
        return Ran(code, out, err.decode())

    return run


def anchor_of(ran: Ran) -> str:
    return next(line for line in ran.text.splitlines() if line.startswith("anchor:")).split()[1]


# --- tests ---------------------------------------------------------------------------


def test_archive_on_every_command_reads_the_whole_history(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    built = build(nats_server.url, tmp_path, "KVD")  # the default stream: no --stream below
    first_snap, newest = built.snapshots

    dump = journal("dump", None)
    assert dump.code == 0, dump.err
    assert dump.out == b"".join(built.lines)  # byte for byte, archive first
    assert "exported stream KVD on" in dump.err and "removed afterwards" in dump.err
    part = journal("dump", None, "--since-seq", str(newest - 1), "--until-seq", str(newest + 1))
    assert part.out == b"".join(built.lines[newest - 2 : newest + 1])

    verify = journal("verify", None)
    assert verify.code == 0, verify.text + verify.err
    assert f"records:   1..{built.last} ({built.last})" in verify.text
    assert f"seq {first_snap}: entries equal the replayed records" in verify.text
    assert f"seq {newest}: entries equal the replayed records" in verify.text
    assert anchor_of(verify) == f"{built.last}:{built.hashes[built.last]}"

    good = journal("verify", None, "--expect-head", f"{newest + 3}:{built.hashes[newest + 3]}")
    assert good.code == 0 and "still has the recorded hash" in good.text
    wrong = journal("verify", None, "--expect-head", f"{newest + 3}:{'ab' * 32}")
    assert wrong.code == 1
    assert f"(seq {newest + 3}): hash {built.hashes[newest + 3]} differs from the recorded head" in wrong.text
    ahead = journal("verify", None, "--expect-head", f"{built.last + 5}:{'cd' * 32}")
    assert ahead.code == 1 and "records were cut off the end" in ahead.text

    for seq in sorted({0, 1, first_snap - 1, first_snap, first_snap + 1, built.last // 2, newest, built.last}):
        replay = journal("replay", None, "--seq", str(seq))
        assert replay.code == 0, replay.err
        assert json.loads(replay.out) == built.model(seq), seq
    at_time = journal("replay", None, "--at", built.times[newest + 1])
    assert json.loads(at_time.out) == built.model(newest + 1)

    for key in ("a", "c"):
        history = journal("history", "KVD", key)
        assert history.code == 0, history.err
        assert [json.loads(line) for line in history.out.splitlines()] == built.history(key)

    stats = journal("stats", None, "--json")
    assert stats.code == 0, stats.err
    numbers = json.loads(stats.out)
    assert numbers["records"] == built.last and numbers["oldest_point"]["seq"] == 0
    assert numbers["head"] == {"seq": built.last, "hash": built.hashes[built.last], "ts": built.times[built.last]}
    assert numbers["snapshots"]["seqs"] == [newest]
    assert numbers["archive"]["snapshots"]["count"] == 1


def test_keep_export_lays_the_stream_out_as_a_data_directory(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    built = build(nats_server.url, tmp_path, "KEEP")
    first_snap, newest = built.snapshots
    kept = tmp_path / "export"
    ran = journal("verify", "KEEP", "--keep-export", str(kept))
    assert ran.code == 0, ran.text + ran.err
    assert f"into {kept}" in ran.err and "removed" not in ran.err

    assert sorted(p.name for p in kept.iterdir()) == sorted(
        ["archive", "nats-export.json", snapshot_name(newest), segment_name(newest + 1)]
    )
    assert sorted(p.name for p in (kept / "archive").iterdir()) == [segment_name(1), snapshot_name(first_snap)]
    # Split right after the newest snapshot's record, though a message held both sides.
    assert (kept / "archive" / segment_name(1)).read_bytes() == b"".join(built.lines[:newest])
    assert (kept / segment_name(newest + 1)).read_bytes() == b"".join(built.lines[newest:])
    manifest = json.loads((kept / "nats-export.json").read_text())
    assert manifest["stream"] == "KEEP" and manifest["records"]["lines"] == built.last
    assert [s["stream_seq"] for s in manifest["snapshots"]] == [built.stream_seq_of[s] for s in built.snapshots]
    shared = built.stream_seq_of[newest]
    assert manifest["segments"][0]["messages"] == [1, shared]
    assert manifest["segments"][1]["messages"] == [shared, len(built.groups)]

    # The kept directory is an ordinary data directory, and is never overwritten.
    again = main(["journal", "verify", "--data-dir", str(kept)])
    assert again == 0
    refused = journal("dump", "KEEP", "--keep-export", str(kept))
    assert refused.code == 1 and "is not empty" in refused.err


def test_archive_off_reads_from_the_newest_snapshot(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    built = build(nats_server.url, tmp_path, "PURGED", snapshots="end", purge="after", seed=7)
    (snap,) = built.snapshots

    dump = journal("dump", "PURGED")
    assert dump.code == 0, dump.err
    assert dump.out == b"".join(built.lines[snap:])
    assert f"records before seq {snap + 1} are no longer retained" in dump.err

    verify = journal("verify", "PURGED")
    assert verify.code == 0, verify.text + verify.err
    assert f"records:   {snap + 1}..{built.last}" in verify.text
    assert "linked to the snapshot before them" in verify.text
    assert anchor_of(verify) == f"{built.last}:{built.hashes[built.last]}"
    good = journal("verify", "PURGED", "--expect-head", f"{snap}:{built.hashes[snap]}")
    assert good.code == 0
    gone = journal("verify", "PURGED", "--expect-head", f"{snap - 2}:{built.hashes[snap - 2]}")
    assert gone.code == 1 and "no longer retained" in gone.text

    for seq in (snap, snap + 1, built.last):
        replay = journal("replay", "PURGED", "--seq", str(seq))
        assert replay.code == 0, replay.err
        assert json.loads(replay.out) == built.model(seq)
    older = journal("replay", "PURGED", "--seq", str(snap - 1))
    assert older.code == 1 and "older than the retained history" in older.err

    history = journal("history", "PURGED", "b")
    assert history.code == 0, history.err
    assert [json.loads(line) for line in history.out.splitlines()] == built.history("b", after=snap)


def test_a_stream_purged_up_to_its_last_record(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    """Right after a compaction without archive, the snapshot is all there is."""
    built = build(nats_server.url, tmp_path, "IDLE", count=30, snapshots="last", purge="after")
    verify = journal("verify", "IDLE", "--expect-head", f"30:{built.hashes[30]}")
    assert verify.code == 0, verify.text + verify.err
    assert "records:   none" in verify.text and anchor_of(verify) == f"30:{built.hashes[30]}"
    assert "no messages, snapshots at seq 30" in verify.err
    dump = journal("dump", "IDLE")
    assert dump.code == 0 and dump.out == b""
    replay = journal("replay", "IDLE", "--seq", "30")
    assert json.loads(replay.out) == built.model(30)


def test_a_tampered_record_is_found_and_named(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    built = build(nats_server.url, tmp_path, "TAMPERED", snapshots="none", tamper=23)
    verify = journal("verify", "TAMPERED")
    assert verify.code == 1
    assert "(seq 23): checksum mismatch" in verify.text
    assert "records 1..22 check out" in verify.text
    assert f"is in message {built.stream_seq_of[23]} of stream TAMPERED" in verify.err
    dump = journal("dump", "TAMPERED")
    assert dump.code == 1 and dump.out == b"".join(built.lines[:22])
    assert "seq 23" in dump.err and f"message {built.stream_seq_of[23]}" in dump.err


def test_segments_split_at_message_boundaries(nats_server, tmp_path) -> None:  # noqa: F811
    built = build(nats_server.url, tmp_path, "SPLIT", count=80, snapshots="none")
    dest = tmp_path / "split"
    dest.mkdir()
    summary = nats_source.export_to([nats_server.url], "SPLIT", dest, segment_bytes=2000)
    assert len(summary.segments) > 3
    assert summary.first_seq == 1 and summary.last_seq == 80 and summary.records == 80
    assert summary.messages == len(built.groups)
    starts = {first for first, _ in built.groups}
    joined = b""
    for segment in summary.segments:
        assert segment.first_seq in starts  # never in the middle of a message
        assert segment.path.name == segment_name(segment.first_seq)
        joined += segment.path.read_bytes()
        # every offset maps back to the message holding it
        seq_at_start = json.loads(segment.path.read_bytes().split(b"\n", 1)[0])["seq"]
        assert segment.message_at(0) == built.stream_seq_of[seq_at_start]
    assert joined == b"".join(built.lines)
    assert main(["journal", "verify", "--data-dir", str(dest)]) == 0


def test_maintenance_commands_refuse_a_nats_store(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    build(nats_server.url, tmp_path, "MAINT", count=10, snapshots="none")
    compact = journal("compact", "MAINT")
    assert compact.code == 2 and "running kvd nodes compact the shared stream" in compact.err
    repair = journal("repair", "MAINT")
    assert repair.code == 2 and "--keep-export" in repair.err
    assert journal("repair", "MAINT", "--dry-run").code == 2
    assert journal("dump", "MAINT").out == journal("dump", "MAINT").out  # nothing changed
    (dead,) = free_ports(1)  # a cluster's URLs, comma-separated: one that is down is skipped
    both = main(["journal", "dump", "--nats", f"nats://127.0.0.1:{dead},{nats_server.url}", "--stream", "MAINT"])
    assert both == 0


def test_bad_sources_fail_cleanly(journal, capsysbinary, tmp_path) -> None:  # noqa: ANN001
    missing = journal("verify", "NOSUCH")
    assert missing.code == 1 and "no stream 'NOSUCH'" in missing.err
    (port,) = free_ports(1)
    code = main(["journal", "stats", "--nats", f"nats://127.0.0.1:{port}"])
    assert code == 1 and "cannot reach NATS" in capsysbinary.readouterr().err.decode()
    code = main(["journal", "dump", "--stream", "KVD", "--data-dir", str(tmp_path)])
    assert code == 2 and "--stream needs --nats" in capsysbinary.readouterr().err.decode()
    with pytest.raises(SystemExit) as both:
        main(["journal", "dump", "--nats", "nats://x", "--data-dir", str(tmp_path)])
    assert both.value.code == 2


def test_a_purge_that_keeps_the_snapshots_message(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    """Purged up to the newest snapshot's message but not that message, which holds later records too."""
    built = build(nats_server.url, tmp_path, "KEPT", snapshots="mid1", purge="keep", seed=3)
    (snap,) = built.snapshots
    first = next(first for first, last in built.groups if first <= snap <= last)
    assert first <= snap < built.groups[built.stream_seq_of[snap] - 1][1]
    kept = tmp_path / "kept"
    verify = journal("verify", "KEPT", "--keep-export", str(kept))
    assert verify.code == 0, verify.text + verify.err
    assert f"records:   {first}..{built.last}" in verify.text
    assert f"not linked back, but the snapshot at seq {snap} covers them" in verify.text
    # Top level, as a file store keeps a segment a compaction has yet to retire: with
    # nothing before it, it is no archived history (which would have to start at seq 1).
    assert (kept / segment_name(first)).read_bytes() == b"".join(built.lines[first - 1 : snap])
    assert not (kept / "archive").exists()
    assert (kept / segment_name(snap + 1)).read_bytes() == b"".join(built.lines[snap:])
    dump = journal("dump", "KEPT")
    assert dump.out == b"".join(built.lines[first - 1 :])
    replay = journal("replay", "KEPT", "--seq", str(built.last))
    assert json.loads(replay.out) == built.model(built.last)


def test_a_stream_missing_its_first_messages_is_damage(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    """No snapshot to start from: the records before the first message left are missing, as
    a file store's start-up would refuse a first segment starting after seq 1."""
    built = build(nats_server.url, tmp_path, "FRONT", count=30, snapshots="none", purge="front")
    first = built.groups[3][0]
    verify = journal("verify", "FRONT")
    assert verify.code == 1
    assert f"(seq 1): records 1..{first - 1} are missing" in verify.text
    assert f"records {first}..{built.last} check out" in verify.text
    dump = journal("dump", "FRONT")
    assert dump.code == 1 and dump.out == b"".join(built.lines[first - 1 :])
    assert f"records 1..{first - 1} are missing" in dump.err


def test_a_deleted_last_message_is_not_waited_for(journal, nats_server, tmp_path) -> None:  # noqa: ANN001, F811
    built = build(nats_server.url, tmp_path, "SHORT", count=20, snapshots="none")

    async def delete_last() -> None:
        client = await nats.connect(nats_server.url)
        await client.jetstream().delete_msg("SHORT", len(built.groups))
        await client.close()

    asyncio.run(delete_last())
    last = built.groups[-2][1]
    verify = journal("verify", "SHORT", "--expect-head", f"{built.last}:{built.hashes[built.last]}")
    assert verify.code == 1 and f"the journal ends at seq {last}" in verify.text
    assert f"(seq {built.last}): the journal ends" in verify.text


def test_an_export_starts_over_when_the_stream_is_purged_under_it(nats_server, tmp_path, monkeypatch) -> None:  # noqa: ANN001, F811
    built = build(nats_server.url, tmp_path, "MOVING", count=20, snapshots="none")
    real = nats_stream.position
    moved = {"times": 1}

    async def position(js, stream):  # noqa: ANN001, ANN202
        where = await real(js, stream)
        if moved["times"] > 0:  # as if a compaction purged the front while reading
            moved["times"] -= 1
            return nats_stream.StreamPosition(where.first + 1, where.last, where.messages - 1)
        return where

    monkeypatch.setattr(nats_stream, "position", position)
    dest = tmp_path / "moving"
    dest.mkdir()
    summary = nats_source.export_to([nats_server.url], "MOVING", dest)
    assert summary.records == built.last and moved["times"] == 0
    assert sorted(p.name for p in dest.iterdir()) == [segment_name(1), "nats-export.json"]

    moved["times"] = nats_source.EXPORT_ATTEMPTS
    with pytest.raises(nats_source.AuditError, match="is not empty"):
        nats_source.export_to([nats_server.url], "MOVING", dest)  # never writes over files
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(nats_source.AuditError, match="kept being compacted"):
        nats_source.export_to([nats_server.url], "MOVING", again)
    assert not any(again.iterdir())  # nothing half-exported is left
