"""JSON in and out: orjson on the fast path, exact for integers of any size.

orjson reads integers beyond 64 bits as floats and refuses to write them, so
a body holding an integer of 19 or more digits goes through the standard
library, which keeps them exact. Both paths reject NaN, Infinity and other non-JSON
tokens, and nesting deeper than ``MAX_DEPTH``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

MAX_DEPTH = 128
"""Deepest nesting of arrays and objects a value may have."""

# An integer of 19+ digits in value position (after `:`, `,` or `[`, or alone)
# may not fit 64 bits. Digit runs inside strings rarely look like that, and a
# false positive only costs the slower exact parse.
_LONG_INTEGER = re.compile(rb"[:,\[]\s*-?\d{19}")
# Maps every digit to "0" and everything else to "x", so a C-speed substring
# test finds runs of 19 digits before any regex runs.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_DIGIT_RUN = b"0" * 19


def may_hold_long_integer(raw: bytes) -> bool:
    """Whether orjson could misread an integer in ``raw`` (it reads >64-bit ones as floats)."""
    if _DIGIT_RUN not in raw.translate(_DIGITS_ONLY):
        return False
    return bool(_LONG_INTEGER.search(raw)) or raw.lstrip()[:1] in b"-0123456789"


class JSONError(ValueError):
    """The input is not JSON kvd accepts."""


def _reject_constant(token: str) -> Any:
    raise JSONError(f"{token} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise JSONError(f"number {text} is out of range")
    return number


_exact_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def loads(data: bytes | str, *, max_depth: int | None = MAX_DEPTH) -> Any:
    """Parse JSON text; raises JSONError with a message fit for a client.

    ``max_depth`` None skips the depth check (for input kvd wrote itself).
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        if may_hold_long_integer(raw):
            value = _exact_decoder.decode(raw.decode("utf-8"))
        else:
            value = orjson.loads(raw)
    except JSONError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise JSONError(f"malformed JSON: {exc}") from None
    if max_depth is not None:
        check_depth(value, max_depth)
    return value


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, the form whose length is a value's size.

    The result is an exact-size copy: orjson's own bytes objects keep a 4 KiB
    allocation however short they are, which would make every stored value
    cost 4 KiB of memory.
    """
    try:
        return memoryview(orjson.dumps(value)).tobytes()
    except orjson.JSONEncodeError:
        pass
    check_depth(value)
    try:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        raise JSONError(f"value cannot be encoded as JSON: {exc}") from None


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise JSONError when ``value`` nests deeper than ``max_depth``."""
    if not isinstance(value, (dict, list)):
        return
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            raise JSONError(f"JSON nested deeper than {max_depth} levels")
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, (dict, list))
        ]
