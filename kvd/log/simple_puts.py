"""Start-up's fast path: the common record recognised by its bytes, a block at a time.

Almost every record in a journal is a *simple put*: one key, no expiry,
actor or client. The record grammar (docs/journal-format.md) fixes every
byte of such a line except the seq, the timestamp, the key, the value and
the two hashes, so one regular expression splits a whole block of lines into
columns (seqs, keys, values, hashes) in C, and the checks run over the
columns: the chain link by comparing two lists, the seqs against a range, the
SHA-256 of each record through ``map``. Replay goes from about 15 µs a
record (full decoding) to about 4.5 µs on the machine docs/benchmarks.md
describes.

The fast path only ever accepts or declines. It accepts a run only when the
full decoder (``format.decode_record`` plus the reader's chain checks) would
give the same key, value and seq for every line of it; anything else (another
op, an expiry, an escaped key, a damaged line, a broken chain) is declined and
goes through the full decoder, which also names what is wrong.
``tests/test_simple_puts.py`` checks that equivalence on many generated and
mutated records.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from operator import add, methodcaller

import orjson

from kvd import jsonio

_SIMPLE_PUT = re.compile(
    # The full decoder takes any JSON string as the time; this takes the characters
    # of the one form kvd writes, as one class (the cheapest to match).
    rb'^(\{"v":1,"seq":(0|[1-9][0-9]*),"ts":"[0-9:.TZ-]+","op":"put","set":\{"'
    rb'([^"\\\x00-\x1f]*)":'  # the key, free of anything JSON escapes
    rb'(?:("[^"\\\x00-\x1f]*")|(.+?))'  # the value: a plain string, or any other text
    rb'\},"prev":"(.{64})"),"hash":"(.{64})"\}\n',
    re.MULTILINE,  # ^: a match starts a line, even where a value holds text shaped like a record
)
_GROUPS = 7  # re.split puts these after each stretch of text between two matches
_LINE_TAIL = len(b',"hash":"') + 64 + len(b'"}\n')  # each line's bytes after its hashed part
_digest = methodcaller("digest")

# A revision (the seq of the record that set the value), as the store keeps it
# right after each value, and as a seal keeps a run's values (seal.py).
REVISION = struct.Struct("<Q")


@dataclass(slots=True)
class SimplePuts:
    """A run of checked simple puts: record ``first_seq + i`` set ``keys[i]`` to ``values[i]``.

    Checked in itself (every hash, every link inside the run); whether it
    continues the journal read so far is ``follows``'s question, asked by the
    reader, which alone knows the record before.
    """

    first_seq: int
    keys: list[str]
    values: list[bytes]  # compact JSON, exactly as stored
    prev: bytes  # the hash the first record chains to
    head: bytes  # the last record's hash
    size: int  # bytes of the run's lines, newlines included
    last_line: bytes  # the last record's line, newline included

    def __len__(self) -> int:
        return len(self.keys)

    def follows(self, seq: int, last_hash: str) -> bool:
        """Whether the run's first record is ``seq`` and chains to ``last_hash``."""
        return self.first_seq == seq and self.prev == last_hash.encode()

    def entries(self) -> Iterator[tuple[list[str], Iterable[bytes]]]:
        """What the run stores, as (keys, each value followed by its REVISION), in order;
        a key may come more than once (the later wins). One batch here; a seal's runs
        (seal.SealedRun) give theirs a few MiB at a time."""
        revisions = map(REVISION.pack, range(self.first_seq, self.first_seq + len(self.keys)))
        yield self.keys, map(add, self.values, revisions)

    def __reduce__(self) -> tuple:
        """Pickled as two joined columns (how the replay helper sends runs): two to three
        times cheaper than an object each. Neither a key (no control character) nor a
        compact JSON value holds a raw newline."""
        columns = "\n".join(self.keys).encode(), b"\n".join(self.values)
        return _unpickle_puts, (self.first_seq, *columns, self.prev, self.head, self.size, self.last_line)


def _unpickle_puts(
    first_seq: int, keys: bytes, values: bytes, prev: bytes, head: bytes, size: int, last_line: bytes
) -> SimplePuts:
    return SimplePuts(first_seq, keys.decode().split("\n"), values.split(b"\n"), prev, head, size, last_line)


@dataclass(slots=True)
class Run:
    """Consecutive lines shaped like simple puts, in columns, not yet checked."""

    hashed: list[bytes]  # each line up to its hash field: what the SHA-256 covers
    seqs: list[bytes]
    keys: list[bytes]
    strings: list[bytes | None]  # the value when it is a plain string
    others: list[bytes | None]  # the value when it is not (to be checked)
    prevs: list[bytes]
    hashes: list[bytes]
    ascii: bool  # its block is all ASCII, so every plain string in it is valid UTF-8

    @property
    def size(self) -> int:
        """Bytes of the run's lines, newlines included."""
        return sum(map(len, self.hashed)) + _LINE_TAIL * len(self.hashed)

    def lines(self) -> list[bytes]:
        """The lines themselves (newline included), for the full decoder."""
        return list(map(_line, self.hashed, self.hashes))

    def last_line(self) -> bytes:
        return _line(self.hashed[-1], self.hashes[-1])


def _line(hashed: bytes, digest: bytes) -> bytes:
    return hashed + b',"hash":"' + digest + b'"}\n'


def split_block(data: bytes) -> list[Run | bytes]:
    """Whole lines (``data`` ends in a newline) in order: runs shaped like simple
    puts, and the text of the other lines between them (newlines included)."""
    parts = _SIMPLE_PUT.split(data)
    if len(parts) == 1:
        return [data] if data else []
    between = parts[0 :: _GROUPS + 1]
    ascii = data.isascii()
    if not any(between):  # every line matched: one run (the common case)
        return [_run(parts, 0, len(parts) // (_GROUPS + 1), ascii)]
    pieces: list[Run | bytes] = []
    matches = len(between) - 1
    start = 0  # the first match of the current run
    for index, text in enumerate(between[:matches]):  # the text before match ``index``
        if text:
            if index > start:
                pieces.append(_run(parts, start, index, ascii))
            pieces.append(text)
            start = index
    pieces.append(_run(parts, start, matches, ascii))
    if between[matches]:
        pieces.append(between[matches])
    return pieces


def _run(parts: list[bytes], first: int, end: int, ascii: bool) -> Run:
    """Matches ``first .. end - 1`` of a ``re.split`` result, as columns."""
    step = _GROUPS + 1
    columns = [parts[first * step + group : end * step : step] for group in range(1, step)]
    hashed, seqs, keys, strings, others, prevs, hashes = columns
    return Run(hashed, seqs, keys, strings, others, prevs, hashes, ascii)  # type: ignore[arg-type]


def check_run(run: Run) -> SimplePuts | None:
    """The run's puts, when every line is a valid simple put and each links to the
    one before; None to leave the whole run to the full decoder."""
    count = len(run.hashed)
    first_seq = int(run.seqs[0])
    hashes = b"".join(run.hashes)
    if (
        run.prevs[1:] != run.hashes[:-1]
        or list(map(int, run.seqs)) != list(range(first_seq, first_seq + count))
        or hashes != hashes.lower()  # the full decoder compares with lower-case hex
    ):
        return None
    try:
        # One comparison of binary digests: a third cheaper than hex digest by digest.
        if b"".join(map(_digest, map(hashlib.sha256, run.hashed))) != binascii.unhexlify(hashes):
            return None
        keys = list(map(bytes.decode, run.keys))  # the key's text is itself: nothing in it is escaped
        if not run.ascii:
            for text in filter(None, run.strings):
                text.decode()  # a plain string is its own compact form, if it is UTF-8
    except (UnicodeDecodeError, binascii.Error):  # binascii.Error: a hash that is not hex
        return None
    values: list[bytes] = run.strings  # type: ignore[assignment]  # all strings unless others
    if any(run.others):
        values = [string or other for string, other in zip(run.strings, run.others, strict=True)]
        if not all(map(_is_exact_value, filter(None, run.others))):
            return None
    return SimplePuts(
        first_seq, keys, values, run.prevs[0], run.hashes[-1], run.size, run.last_line()
    )


def _is_exact_value(text: bytes) -> bool:
    """Whether ``text`` is one JSON value, in the form the full decoder would store it."""
    try:
        return jsonio.dumps(orjson.loads(text)) == text
    except (orjson.JSONDecodeError, jsonio.JSONError):
        return False
