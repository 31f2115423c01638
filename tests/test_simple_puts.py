"""Start-up's fast path for simple puts (kvd/log/simple_puts.py) against the full decoder.

The fast path may decline any line; what it must never do is accept a line
the full decoder (``decode_record`` plus the chain checks) would reject, or
decode one differently. These tests check that on generated records of every
shape and on many mutated lines whose hashes were made valid again.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest

from kvd.log import reader as reader_module
from kvd.log.format import GENESIS_HASH, RecordError, decode_record, encode_record, segment_name
from kvd.log.reader import JournalCorrupt, JournalReader
from kvd.log.simple_puts import _SIMPLE_PUT, Run, SimplePuts, check_run, split_block
from kvd.store import Store

TS = "2026-11-27T21:05:23.741245Z"

VALUES = [
    b'"plain ascii value"', b'""', b'"caf\xc3\xa9 \xe2\x82\xac"', b'"tab\\there \\"quoted\\""',
    b'"\\u0001"', b"0", b"-12", b"3.5", b"1e+100", b"12345678901234567890123",
    b"-1234567890123456789", b"true", b"false", b"null", b"[]", b"{}", b'[1,"two",{"3":null}]',
    b'{"a":{"b":[1,2,{"c":"},\\"prev\\":\\""}]}}', b'"},\\"prev\\":\\"' + b"0" * 64 + b'\\""',
]
KEYS = ["k1", "key-with.dots_and/slashes", "caf\u00e9", "\u20ac", 'q"uote', "back\\slash",
        "ctl\u0001", '":', "sp ace", "", "x" * 300]


def line_of(seq: int, prev: str, **fields) -> tuple[bytes, str]:
    """One encoded line without its newline, and its hash."""
    line, digest = encode_record(seq=seq, ts=TS, prev=prev, **fields)
    return line[:-1], digest


def full_decode(line: bytes, seq: int, prev: str) -> tuple[str, bytes, int] | None:
    """What the full decoder makes of a line at ``seq`` after ``prev``: a simple put's
    (key, value, seq), None for a valid record of another shape; raises RecordError."""
    record = decode_record(line + b"\n")
    if record.seq != seq or record.prev != prev:
        raise RecordError("not the next record in the chain")
    if (record.op != "put" or len(record.set) != 1 or record.expires or record.actor
            or record.client is not None):
        return None
    ((key, value),) = record.set.items()
    return key, value, record.seq


def take(lines: list[bytes], seq: int, prev: str) -> list[tuple[str, bytes, int]] | None:
    """The simple puts the fast path takes from ``lines`` (no newlines), read as one block
    at ``seq`` after ``prev``; None when it leaves them to the full decoder."""
    pieces = split_block(b"".join(line + b"\n" for line in lines))
    if len(pieces) != 1 or not isinstance(pieces[0], Run):
        return None
    puts = check_run(pieces[0])
    if puts is None or not puts.follows(seq, prev):
        return None
    return [(key, value, puts.first_seq + index)
            for index, (key, value) in enumerate(zip(puts.keys, puts.values, strict=True))]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("key", KEYS)
def test_every_simple_put_decodes_as_the_full_decoder_does(key, value):
    line, digest = line_of(7, "a" * 64, op="put", set_values={key: value})
    puts = take([line], 7, "a" * 64)
    assert full_decode(line, 7, "a" * 64) == (key, value, 7)
    assert puts is None or puts == [(key, value, 7)]


def test_the_common_shapes_take_the_fast_path():
    """Declining is always safe, but the point is speed: ordinary puts must be taken."""
    lines, prev = [], GENESIS_HASH
    for seq, (key, value) in enumerate(
        [("k1", b'"v"'), ("user:42", b'{"name":"Ann","tags":["a","b"]}'), ("n", b"12"),
         ("caf\u00e9", b'"caf\xc3\xa9"'), ("f", b"1.5"), ("l", b"[1,2,3]"), ("e", b'""')],
        start=1,
    ):
        line, prev = line_of(seq, prev, op="put", set_values={key: value})
        lines.append(line)
    puts = take(lines, 1, GENESIS_HASH)
    assert puts is not None
    assert [put[2] for put in puts] == list(range(1, len(lines) + 1))


@pytest.mark.parametrize(
    "fields",
    [
        {"op": "put", "set_values": {"a": b"1", "b": b"2"}},
        {"op": "put", "set_values": {"a": b"1"}, "expires": {"a": 1_800_000_000.5}},
        {"op": "put", "set_values": {"a": b"1"}, "actor": "alice"},
        {"op": "put", "set_values": {"a": b"1"}, "client": "127.0.0.1"},
        {"op": "put", "set_values": {"a": b'"x"'}, "client": "127.0.0.1"},
        {"op": "put", "set_values": {}},
        {"op": "delete", "keys": ["a"]},
        {"op": "expire", "keys": ["a", "b"]},
        {"op": "clear"},
    ],
)
def test_other_shapes_are_declined(fields):
    line, _ = line_of(3, "b" * 64, **fields)
    assert full_decode(line, 3, "b" * 64) is None
    assert take([line], 3, "b" * 64) is None


def test_a_line_out_of_the_chain_is_declined():
    line, _ = line_of(5, "c" * 64, op="put", set_values={"a": b"1"})
    assert take([line], 5, "c" * 64) == [("a", b"1", 5)]
    assert take([line], 6, "c" * 64) is None  # wrong seq
    assert take([line], 4, "c" * 64) is None
    assert take([line], 5, "d" * 64) is None  # wrong prev
    damaged = line.replace(b'"a":1', b'"a":2')  # the hash no longer matches
    assert take([damaged], 5, "c" * 64) is None
    assert take([line[:-1] + b"]"], 5, "c" * 64) is None  # not the record's end
    assert take([line + b" "], 5, "c" * 64) is None
    # In a run, one line out of place declines the whole run.
    second, _ = line_of(6, "9" * 64, op="put", set_values={"b": b"2"})
    assert take([line, second], 5, "c" * 64) is None


def test_a_hash_not_in_lower_case_hex_is_declined():
    """The digests are compared in binary; the stored text must still be what the full
    decoder compares with: lower-case hex."""
    line, digest = line_of(5, "c" * 64, op="put", set_values={"a": b"1"})
    assert any(char in "abcdef" for char in digest)
    upper = line.replace(digest.encode(), digest.upper().encode())
    with pytest.raises(RecordError):
        decode_record(upper + b"\n")
    assert take([upper], 5, "c" * 64) is None
    not_hex = line.replace(digest.encode(), b"g" * 64)
    assert take([not_hex], 5, "c" * 64) is None
    assert take([line], 5, "c" * 64) == [("a", b"1", 5)]


def test_a_block_splits_into_runs_and_other_lines_in_order():
    lines, prev = [], GENESIS_HASH
    shapes = [{"op": "put", "set_values": {"a": b"1"}}, {"op": "put", "set_values": {"b": b'"x"'}},
              {"op": "delete", "keys": ["a"]}, {"op": "clear"},
              {"op": "put", "set_values": {"c": b"[]"}}, {"op": "delete", "keys": ["c"]}]
    for seq, fields in enumerate(shapes, start=1):
        line, prev = line_of(seq, prev, **fields)
        lines.append(line + b"\n")
    pieces = split_block(b"".join(lines))
    assert [piece.lines() if isinstance(piece, Run) else piece for piece in pieces] == [
        lines[0:2], lines[2] + lines[3], lines[4:5], lines[5]
    ]
    assert [piece.size for piece in pieces if isinstance(piece, Run)] == [
        len(lines[0]) + len(lines[1]), len(lines[4])
    ]
    assert split_block(b"") == []


def test_a_record_shaped_value_inside_another_line_is_not_a_run():
    """Runs start at line starts: a value holding text shaped like a simple put, up to
    the line's own end, leaves its line (whose escaped key the fast path declines) whole
    to the full decoder."""
    inner, _ = line_of(2, GENESIS_HASH, op="put", set_values={"x": b"1"})
    value = inner[: inner.index(b',"prev":"')] + b"}"  # {"v":1,...,"set":{"x":1}}
    line, _ = line_of(2, GENESIS_HASH, op="put", set_values={'q"uote': value})
    unanchored = re.compile(_SIMPLE_PUT.pattern.removeprefix(b"^"))
    assert unanchored.search(line + b"\n").start() > 0  # what the ^ is there for
    assert split_block(line + b"\n") == [line + b"\n"]


def rehash(body: bytes) -> bytes:
    """A line whose hash field is valid for ``body`` (what a forger or a buggy writer makes)."""
    return body + b',"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'"}'


SET_AT = b'"op":"put","set":{'


@pytest.mark.parametrize(
    "pair",
    [
        b'"a"b":"',  # a raw quote in the key, and a value of one quote
        b'"a\x01":1',  # a raw control character in the key
        b'"a":"b\x01"',  # and in a string value
        b'"a":"x","b":"y"',  # two keys
        b'"a":1,"a":2',  # the same key twice
        b'"a":"x"},"expires":{"a":"' + TS.encode() + b'"',  # an expiry after the value
        b'"a":01',  # not JSON
        b'"a":"x" ',  # whitespace
        b'"a": "x"',
        b'"a":1.50',  # not the compact form of its number
        b'"a":"\xff"',  # not UTF-8
    ],
)
def test_forged_lines_with_valid_hashes_are_declined(pair):
    body = (b'{"v":1,"seq":4,"ts":"' + TS.encode() + b'",' + SET_AT + pair
            + b'},"prev":"' + b"f" * 64 + b'"')
    line = rehash(body)
    # The full decoder rejects these, finds another shape, or (1.50) stores another
    # form of the value: the fast path must leave every one of them to it.
    assert take([line], 4, "f" * 64) is None


def test_mutated_lines_with_valid_hashes_are_never_misread():
    """Random edits to simple puts, hashed again: whatever the fast path takes, the full
    decoder must accept as the same simple put."""
    rng = random.Random(20261128)
    alphabet = b'{}[]":,\\0123456789abcdefprvhsetkyuT.-Z \x01\xc3\xa9'
    prev = "e" * 64
    checked = taken_count = 0
    for round_ in range(6000):
        key = rng.choice(KEYS)
        value = rng.choice(VALUES)
        seq = rng.choice([1, 9, 10, 99, 12345])
        line, _ = line_of(seq, prev, op="put", set_values={key: value})
        body = bytearray(line[: line.index(b',"hash":"')])
        set_at = body.index(SET_AT) + len(SET_AT)
        for _ in range(rng.randint(1, 3)):
            # Half of the edits land in the key and value, where the slicing is subtle.
            at = rng.randrange(set_at, len(body) - 70) if rng.random() < 0.5 else rng.randrange(len(body) + 1)
            choice = rng.random()
            if choice < 0.4 and at < len(body):
                body[at] = rng.choice(alphabet)
            elif choice < 0.7:
                body[at:at] = bytes([rng.choice(alphabet)])
            elif at < len(body):
                del body[at : at + rng.randint(1, 4)]
        mutated = rehash(bytes(body))
        puts = take([mutated], seq, prev)
        if puts is not None:
            taken_count += 1
            assert full_decode(mutated, seq, prev) == puts[0], (round_, mutated)
        checked += 1
    assert checked == 6000 and taken_count > 100  # some mutations stay valid simple puts


def write_journal(directory, records: list[dict]) -> list[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    lines, prev = [], GENESIS_HASH
    for seq, fields in enumerate(records, start=1):
        line, prev = encode_record(seq=seq, ts=TS, prev=prev, **fields)
        lines.append(line)
    (directory / segment_name(1)).write_bytes(b"".join(lines))
    return lines


def mixed_records(count: int) -> list[dict]:
    rng = random.Random(7)
    records = []
    for index in range(count):
        key = f"k{rng.randrange(50)}"
        roll = rng.random()
        if roll < 0.7:
            records.append({"op": "put", "set_values": {key: json.dumps(index).encode()}})
        elif roll < 0.8:
            records.append({"op": "put", "set_values": {key: b'"e"'},
                            "expires": {key: 1_900_000_000.0 + index}})
        elif roll < 0.9:
            records.append({"op": "put", "set_values": {key: b"1", f"{key}x": b"2"}})
        elif roll < 0.98 or index > count - 500:
            records.append({"op": "delete", "keys": [key]})
        else:
            records.append({"op": "clear"})
    return records


def replayed_store(directory, simple_puts: bool) -> Store:
    store = Store()
    for item in JournalReader(directory).items(simple_puts=simple_puts):
        if isinstance(item, SimplePuts):
            store.replay_puts(item)
        else:
            store.apply(item)
    store.finish_replay()
    return store


@pytest.mark.parametrize("block_bytes", [4096, 8 * 1024 * 1024])
def test_replay_with_the_fast_path_builds_the_same_store(tmp_path, monkeypatch, block_bytes):
    """Same entries, revisions, expiries, live bytes and expiry count as record by record,
    also when blocks end in the middle of lines."""
    monkeypatch.setattr(reader_module, "_BLOCK_BYTES", block_bytes)
    write_journal(tmp_path, mixed_records(3000))
    fast = replayed_store(tmp_path, simple_puts=True)
    slow = replayed_store(tmp_path, simple_puts=False)
    assert fast.committed_entries() == slow.committed_entries()
    assert len(fast) > 10
    assert fast.live_bytes == slow.live_bytes
    assert fast._expiry == slow._expiry
    assert sorted(fast._expiry_heap) == sorted(slow._expiry_heap)


def test_damage_after_simple_puts_is_named_where_it_is(tmp_path, monkeypatch):
    """The fast path declines the damaged line; the full decoder names it, at its offset."""
    monkeypatch.setattr(reader_module, "_BLOCK_BYTES", 4096)
    lines = write_journal(tmp_path, [{"op": "put", "set_values": {f"k{n}": b'"v"'}}
                                     for n in range(200)])
    offset = sum(map(len, lines[:150]))
    data = bytearray((tmp_path / segment_name(1)).read_bytes())
    data[offset + 60] ^= 0x01
    (tmp_path / segment_name(1)).write_bytes(bytes(data))
    reader = JournalReader(tmp_path)
    seen = []
    with pytest.raises(JournalCorrupt) as caught:
        for item in reader.items():
            if isinstance(item, SimplePuts):
                seen.extend(range(item.first_seq, item.first_seq + len(item)))
            else:
                seen.append(item.seq)
    assert caught.value.offset == offset and caught.value.seq == 151
    assert seen == list(range(1, 151))


def test_a_torn_tail_after_simple_puts_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_module, "_BLOCK_BYTES", 4096)
    lines = write_journal(tmp_path, [{"op": "put", "set_values": {f"k{n}": b'"v"'}}
                                     for n in range(100)])
    path = tmp_path / segment_name(1)
    path.write_bytes(path.read_bytes() + lines[0][:40])
    reader = JournalReader(tmp_path)
    count = sum(len(item) if isinstance(item, SimplePuts) else 1 for item in reader.items())
    assert count == 100 and reader.last_seq == 100
    assert reader.torn_tail is not None and reader.torn_tail.offset == sum(map(len, lines))
    assert reader.last_line == lines[-1]


def test_a_run_the_fast_path_declines_is_replayed_in_full(tmp_path):
    """A valid record the fast path cannot take as it stands (its number is not in compact
    form, so the full decoder stores it re-encoded) sits in the middle of simple puts: the
    whole run goes through the full decoder and the store is the same."""
    lines = write_journal(tmp_path, [{"op": "put", "set_values": {f"k{n}": b"%d" % n}}
                                     for n in range(50)])
    # Record 21 (key k20) with the same prev, another form of its number, hashed again.
    odd = rehash(lines[20][: lines[20].index(b',"hash":"')].replace(b'"k20":20', b'"k20":2.50'))
    prev = decode_record(odd + b"\n").hash
    later = [odd + b"\n"]
    for seq in range(22, 51):
        line, prev = encode_record(seq=seq, ts=TS, prev=prev, op="put",
                                   set_values={f"k{seq - 1}": b"%d" % (seq - 1)})
        later.append(line)
    (tmp_path / segment_name(1)).write_bytes(b"".join(lines[:20] + later))
    fast = replayed_store(tmp_path, simple_puts=True)
    slow = replayed_store(tmp_path, simple_puts=False)
    assert fast.committed_entries() == slow.committed_entries()
    assert fast.get("k20").value == b"2.5" and fast.get("k49").value == b"49"
    assert fast.live_bytes == slow.live_bytes
