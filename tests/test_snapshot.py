"""The snapshot file: round trip, and every kind of damage is detected (never a silently different state)."""

from __future__ import annotations

import os
import random

import pytest

from kvd.log import snapshot as snapshot_module
from kvd.log.snapshot import SnapshotCorrupt, SnapshotHeader, read_snapshot, write_snapshot
from kvd.model import Entry

ENTRIES = {
    "a": Entry(b'"hello"', 3, None),
    'quote"key,"v":x': Entry(b'{"v":1,"nested":[1,2,{"v":null}]}', 7, 1_900_000_000.25),
    "newline\nkey\\": Entry(b"null", 9, None),
    "ünïcode/☃": Entry(b"123456789012345678901234567890", 11, None),
}


def write(tmp_path, entries=ENTRIES):  # noqa: ANN001, ANN201
    header = SnapshotHeader(42, "2026-11-27T23:00:00.000000Z", "ab" * 32, len(entries))
    return write_snapshot(tmp_path, header, sorted(entries.items()))


def load(path):  # noqa: ANN001, ANN201
    header, items = read_snapshot(path)
    return header, dict(items)


def test_round_trip_keeps_keys_values_revisions_and_expiry(tmp_path):
    path = write(tmp_path)
    assert path.name == "snapshot-00000000000000000042.jsonl"
    header, entries = load(path)
    assert header.seq == 42 and header.keys == 4 and header.head == "ab" * 32
    assert entries == ENTRIES


def test_the_records_a_snapshot_covers_are_synced_before_it_is_renamed_into_place(
        tmp_path, monkeypatch):
    """Under fsync = everysec or no the last covered records may be only in the page
    cache: the snapshot must not reach the disk before them."""
    from kvd.log.format import segment_name

    for first in (1, 20, 50):  # the snapshot at 42 is taken in the middle of segment 20
        (tmp_path / segment_name(first)).write_bytes(b"")
    events: list[str] = []
    real_fdatasync, real_replace = snapshot_module.os.fdatasync, snapshot_module.os.replace

    def fdatasync(fd: int) -> None:
        events.append("sync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fdatasync(fd)

    def replace(source, target) -> None:  # noqa: ANN001
        events.append("rename " + os.path.basename(target))
        real_replace(source, target)

    monkeypatch.setattr(snapshot_module.os, "fdatasync", fdatasync)
    monkeypatch.setattr(snapshot_module.os, "replace", replace)
    write(tmp_path)
    assert events == [f"sync {segment_name(20)}", "rename snapshot-00000000000000000042.jsonl"]


def test_sliced_entries_decode_as_the_json_decoder_does():
    """Start-up splits common entry lines apart instead of parsing them; every key shape
    must come back exactly as ``decode_entry`` (a JSON parse) reads it."""
    keys = ["a", "", "k" * 300, 'q"', "b\\s", "c\u0001", '","r":5,"v":', "café", "☃", "x,y:z"]
    values = [b'"v"', b"1", b'{"a":[1,{"b":null}]}', b'"\\u0000"', b"-0.5"]
    lines = [
        snapshot_module.encode_entry(key, Entry(value, revision, expiry))[:-1]
        for key in keys for value in values
        for revision, expiry in [(1, None), (123456789, None), (7, 1_900_000_000.5)]
    ]
    assert snapshot_module._decode_entries(lines) == [
        snapshot_module.decode_entry(line) for line in lines
    ]
    # And split out of a whole chunk by the pattern (escaped keys left to the line decoder).
    chunk = snapshot_module._decode_chunk(b"".join(line + b"\n" for line in lines))
    assert sorted(map(repr, chunk.entries())) == sorted(
        repr(snapshot_module.decode_entry(line)) for line in lines
    )
    assert len(chunk) == len(lines)


def test_entries_spanning_read_chunks_are_read_whole(tmp_path, monkeypatch):
    many = {f"key{i:05d}": Entry(b'"' + b"x" * (i % 50) + b'"', i + 1, None) for i in range(3000)}
    path = write(tmp_path, many)
    monkeypatch.setattr(snapshot_module, "CHUNK_BYTES", 97)  # lines cut across chunks
    assert load(path)[1] == many


def test_an_empty_store_snapshot_reads_back_empty(tmp_path):
    assert load(write(tmp_path, {}))[1] == {}


def test_every_truncation_is_detected(tmp_path):
    path = write(tmp_path)
    data = path.read_bytes()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(SnapshotCorrupt):
            load(path)


def test_flipped_bytes_are_detected(tmp_path):
    path = write(tmp_path)
    data = path.read_bytes()
    rng = random.Random(7)
    for offset in rng.sample(range(len(data)), min(len(data), 200)):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        try:
            header, entries = load(path)
        except SnapshotCorrupt:
            continue
        pytest.fail(f"flip at byte {offset} read back as {header} {entries}")


@pytest.mark.parametrize(
    "edit",
    [
        lambda lines: lines[:1] + lines[2:],  # an entry removed
        lambda lines: lines[:2] + [lines[1]] + lines[2:],  # an entry duplicated
        lambda lines: lines + [b'{"k":"z","r":1,"v":1}\n'],  # data after the trailer
        lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],  # entries reordered
    ],
    ids=["removed", "duplicated", "appended", "reordered"],
)
def test_line_edits_are_detected(tmp_path, edit):
    path = write(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(edit(lines)))
    with pytest.raises(SnapshotCorrupt):
        load(path)


def test_a_renamed_snapshot_is_detected(tmp_path):
    path = write(tmp_path)
    renamed = path.rename(tmp_path / "snapshot-00000000000000000041.jsonl")
    with pytest.raises(SnapshotCorrupt, match="differs from the file name"):
        read_snapshot(renamed)
