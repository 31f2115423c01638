"""The journal's on-disk record format, shared by reader and writer.

One record is one line of UTF-8 JSON ending in ``\\n``. The ``hash`` field is
always last and fixed-width, so a record's hashed bytes are the line itself up
to (not including) ``,"hash":"``. Because those bytes include ``prev`` (the hash
of the record before), editing, inserting, removing or reordering any record
breaks the chain. ``docs/journal-format.md`` is the normative description.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from kvd import jsonio

FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
SEGMENT_SUFFIX = ".jsonl"

OP_PUT = "put"
OP_DELETE = "delete"
OP_CLEAR = "clear"
OP_EXPIRE = "expire"
OPS = (OP_PUT, OP_DELETE, OP_CLEAR, OP_EXPIRE)

_HASH_PREFIX = b',"hash":"'
_HASH_HEX_LEN = 64
# ,"hash":"<64 hex>"}\n
_HASH_TRAILER_LEN = len(_HASH_PREFIX) + _HASH_HEX_LEN + len(b'"}\n')


class RecordError(ValueError):
    """A line is not a valid record (bad JSON, bad hash, broken chain)."""


@dataclass(slots=True)
class Record:
    """One committed journal entry, as read back or as just written.

    Treat it as immutable (not frozen only because frozen dataclasses are
    slow to build, and replay builds one per record).

    ``set`` maps keys to their JSON-encoded values (bytes, exactly as stored);
    ``expires`` maps a subset of those keys to absolute expiry times (epoch
    seconds); ``keys`` lists the keys a delete or expire removes.
    """

    seq: int
    ts: str
    op: str
    set: dict[str, bytes]
    expires: dict[str, float]
    keys: tuple[str, ...]
    actor: str | None
    prev: str
    hash: str
    client: str | None
    line: bytes  # the encoded line itself, as the feed and audit tools pass it on

    @property
    def size(self) -> int:
        """Bytes of the encoded line, newline included."""
        return len(self.line)

    def touches(self, match: Callable[[str], bool]) -> bool:
        """Whether the record changes a key ``match`` accepts (a clear changes every key)."""
        if self.op == OP_CLEAR:
            return True
        return any(match(key) for key in (self.set if self.op == OP_PUT else self.keys))


_second_cache: tuple[int, str] = (-1, "")


def format_ts(epoch: float) -> str:
    """ISO 8601 UTC with microseconds and a ``Z``: ``2026-11-27T18:38:34.123456Z``.

    Every record needs one; the part up to the second is formatted once a
    second, not once a record. Thread-safe: snapshots and history reads call
    it off the loop, so the cache is read once into a local (another thread
    may replace it between a check and a second read).
    """
    global _second_cache
    micros = round(epoch * 1_000_000)
    second, fraction = divmod(micros, 1_000_000)
    cached = _second_cache
    if cached[0] != second:
        cached = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        _second_cache = cached
    return f"{cached[1]}.{fraction:06d}Z"


def parse_ts(text: str) -> float:
    """Epoch seconds of an ISO 8601 time; a time without zone is taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def encode_record(
    *,
    seq: int,
    ts: str,
    op: str,
    prev: str,
    set_values: dict[str, bytes] | None = None,
    expires: dict[str, float] | None = None,
    keys: list[str] | tuple[str, ...] | None = None,
    actor: str | None = None,
    client: str | None = None,
) -> tuple[bytes, str]:
    """Encode one record; returns the line (with ``\\n``) and its hash."""
    body: dict[str, Any] = {"v": FORMAT_VERSION, "seq": seq, "ts": ts, "op": op}
    if set_values is not None:
        body["set"] = {key: orjson.Fragment(value) for key, value in set_values.items()}
    if expires:
        body["expires"] = {key: format_ts(at) for key, at in expires.items()}
    if keys is not None:
        body["keys"] = list(keys)
    if actor is not None:
        body["actor"] = actor
    if client is not None:
        body["client"] = client
    body["prev"] = prev
    hashed = orjson.dumps(body)[:-1]  # drop the closing brace; the hash field follows
    digest = hashlib.sha256(hashed).hexdigest()
    return hashed + _HASH_PREFIX + digest.encode() + b'"}\n', digest


def has_hash_trailer(line: bytes) -> bool:
    """Whether ``line`` (newline included) ends as every whole record does, in its
    ``hash`` field: the shape of a complete record, whatever its checksum."""
    cut = len(line) - _HASH_TRAILER_LEN
    return cut > 0 and line.endswith(b'"}\n') and line[cut : cut + len(_HASH_PREFIX)] == _HASH_PREFIX


def decode_record(line: bytes) -> Record:
    """Parse and check one complete line (``\\n`` included); raises RecordError.

    Checks the record's own hash. The chain (``prev`` equals the previous
    record's hash, ``seq`` one more) is the caller's to check, since only the
    caller knows the record before.
    """
    if len(line) <= _HASH_TRAILER_LEN or not line.endswith(b'"}\n'):
        raise RecordError("not a complete record")
    if not has_hash_trailer(line):
        raise RecordError("hash field missing or not last")
    cut = len(line) - _HASH_TRAILER_LEN
    stored_hash = line[cut + len(_HASH_PREFIX) : -3].decode("ascii", "replace")
    if hashlib.sha256(line[:cut]).hexdigest() != stored_hash:
        raise RecordError("checksum mismatch")
    try:
        if jsonio.needs_exact_parse(line):
            fields = jsonio.loads(line, max_depth=None)  # depth was checked when written
        else:
            fields = orjson.loads(line)
    except (jsonio.JSONError, orjson.JSONDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from None
    try:
        if fields.get("v") != FORMAT_VERSION:
            raise RecordError(f"unsupported format version {fields.get('v')!r}")
        op = fields["op"]
        if op not in OPS:
            raise RecordError(f"unknown op {op!r}")
        raw_set = fields.get("set")
        set_values = (
            {key: jsonio.dumps(value) for key, value in raw_set.items()} if raw_set else {}
        )
        raw_expires = fields.get("expires")
        expires = (
            {key: parse_ts(at) for key, at in raw_expires.items()} if raw_expires else {}
        )
        return Record(  # positional: measurably faster, and replay builds millions
            int(fields["seq"]), fields["ts"], op, set_values, expires,
            tuple(fields.get("keys", ())), fields.get("actor"), fields["prev"], stored_hash,
            fields.get("client"), line,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"malformed record: {exc!r}") from None


def segment_name(first_seq: int) -> str:
    """Segment files are named by the first sequence number they may hold."""
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"
