"""Start-up's fast path: the common record recognised by its bytes.

Almost every record in a journal is a *simple put*: one key, no expiry,
actor or client. The record grammar (docs/journal-format.md) fixes every
byte of such a line except the seq, the timestamp, the key, the value and
the two hashes, so its fields can be sliced out at C speed instead of parsing
the whole line and re-encoding the value: replay goes from about 15 µs to
about 4 µs a record.

The fast path only ever accepts or declines. It accepts a line only when the
full decoder (``format.decode_record`` plus the reader's chain checks) would
give the same key, value and seq; anything else (another op, an expiry, an
escaped key, a damaged line, a broken chain) is declined and goes through the
full decoder, which also names what is wrong. ``tests/test_simple_puts.py``
checks that equivalence on many generated and mutated records.
"""

from __future__ import annotations

import hashlib

import orjson

from kvd import jsonio
from kvd.log.format import ESCAPED_IN_JSON

_HEAD = b'{"v":1,"seq":%d,"ts":"'  # % seq
# The timestamp (its digits mapped to 0), the op and the opening of the set
# object up to the key's first character.
_STAMP_AND_OP = b'0000-00-00T00:00:00.000000Z","op":"put","set":{"'
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_PREV_FIELD = b'},"prev":"'  # closes the set object: the one key was the only one
_HASH_FIELD = b'","hash":"'  # closes prev
_TAIL = len(_HASH_FIELD) - 1 + 64 + len(b'"}')  # bytes after the hashed part
_VALUE_TO_HASH = len(_PREV_FIELD) + 64 + len(_HASH_FIELD)

SimplePut = tuple[str, bytes, int]
"""A simple put's key, value (compact JSON bytes, exactly as stored) and seq."""


def take_simple_puts(
    lines: list[bytes], index: int, seq: int, last_hash: str
) -> tuple[list[SimplePut], int, str]:
    """Decode ``lines[index:]`` (no newlines) while they are simple puts continuing the chain.

    ``seq`` is the seq the first of them must have and ``last_hash`` the
    hash it must link to. Returns the puts, the index of the first line not
    taken, and the hash of the last one taken (``last_hash`` when none was).
    """
    puts: list[SimplePut] = []
    append = puts.append
    prev = last_hash.encode()
    sha256 = hashlib.sha256
    count = len(lines)
    while index < count:
        line = lines[index]
        head = _HEAD % seq
        key_start = len(head) + len(_STAMP_AND_OP)
        cut = len(line) - _TAIL  # the hashed part ends here
        value_end = cut + len(_HASH_FIELD) - 1 - _VALUE_TO_HASH
        if not (
            cut > key_start
            and line.startswith(head)
            and line[len(head) : key_start].translate(_DIGITS_TO_ZERO) == _STAMP_AND_OP
            and line[value_end : cut + len(_HASH_FIELD) - 1] == _PREV_FIELD + prev + _HASH_FIELD
            and line.endswith(b'"}')
        ):
            break
        digest = line[cut + len(_HASH_FIELD) - 1 : -2]
        if sha256(line[:cut]).hexdigest().encode() != digest:
            break
        # The key and the value: "key":"value" in the common case.
        pair = line[key_start:value_end]
        key_end = pair.find(b'":"')
        if (
            key_end >= 0
            and len(pair) - key_end >= 4  # the value has its two quotes
            and pair.endswith(b'"')
            and pair.isascii()
            # Only the three quotes just found: no other quote, escape or control character.
            and len(pair.translate(None, ESCAPED_IN_JSON)) == len(pair) - 3
        ):
            key = pair[:key_end].decode()
            value = pair[key_end + 2 :]
        else:
            key_end = pair.find(b'":')
            raw_key = pair[:key_end]
            value = pair[key_end + 2 :]
            if (
                key_end < 0
                or len(raw_key.translate(None, ESCAPED_IN_JSON)) != len(raw_key)
                or not _is_exact_value(value)
            ):
                break
            try:
                key = raw_key.decode()
            except UnicodeDecodeError:
                break
        append((key, value, seq))
        prev = digest
        seq += 1
        index += 1
    return puts, index, prev.decode()


def _is_exact_value(text: bytes) -> bool:
    """Whether ``text`` is one JSON value, in the form the full decoder would store it."""
    if (
        text[:1] == b'"'
        and text.isascii()
        and len(text) >= 2
        and len(text.translate(None, ESCAPED_IN_JSON)) == len(text) - 2
        and text.endswith(b'"')
    ):
        return True  # a plain ASCII string: its text is its compact encoding
    try:
        return jsonio.dumps(orjson.loads(text)) == text
    except (orjson.JSONDecodeError, jsonio.JSONError):
        return False
