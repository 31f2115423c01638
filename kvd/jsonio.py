"""JSON in and out: orjson on the fast path, exact for every number.

orjson reads numbers as 64-bit integers or doubles: an integer beyond 64 bits
becomes a float, a decimal with more digits than a double holds is rounded
(``3.14159265358979323846`` to ``3.141592653589793``), and a tiny exponent is
flushed to zero (``1e-400``). A body that may hold such a number goes through
the standard library's parser instead, which keeps big integers as ints and
every number a double would change as its own text (an ``orjson.Fragment``),
written back unchanged. Both paths refuse a number beyond a double's range
(``1e400``), an integer of more than ``MAX_INT_DIGITS`` digits, NaN, Infinity
and other non-JSON tokens, and nesting deeper than ``MAX_DEPTH``.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

import orjson

MAX_DEPTH = 128
"""Deepest nesting of arrays and objects a value may have."""

MAX_INT_DIGITS = 4300
"""Most digits an integer may have: Python's default limit on converting text to int
(``sys.get_int_max_str_digits``), kept because the conversion takes quadratic time."""

# A number in value position (after `:`, `,` or `[`, or alone) with 16 or more
# digits, or a negative exponent of 3 or more digits, may be one orjson changes (an
# exponent alone cannot: a double's range is 1e-324 to 1e308, and orjson refuses
# beyond the top). Digit runs inside strings rarely look like that, and a false
# positive only costs the slower exact parse.
_INEXACT_NUMBER = re.compile(rb"(?:^|[:,\[])\s*-?(?:\d(?:\.?\d){15}|\d+(?:\.\d+)?[eE]-\d{3})")
# Maps digits and "." to "0", "e" and "E" to "e", "-" to itself and everything else
# to "x", so C-speed substring tests rule most bodies out before any regex runs.
_NUMBER_SHAPES = bytes(
    0x30 if 0x30 <= b <= 0x39 or b == 0x2E else 0x65 if b in (0x45, 0x65) else b if b == 0x2D else 0x78
    for b in range(256)
)
_DIGIT_RUN = b"0" * 16
_TINY_EXPONENT = b"0e-000"


def needs_exact_parse(raw: bytes) -> bool:
    """Whether orjson could change a number in ``raw`` (see the module's docstring)."""
    shapes = raw.translate(_NUMBER_SHAPES)
    if _DIGIT_RUN not in shapes and _TINY_EXPONENT not in shapes:
        return False
    return bool(_INEXACT_NUMBER.search(raw))


class JSONError(ValueError):
    """The input is not JSON kvd accepts."""


def _reject_constant(token: str) -> Any:
    raise JSONError(f"{token} is not valid JSON")


def _exact_number(text: str) -> float | orjson.Fragment:
    """A float when it is the number ``text`` says, else the text itself, kept as it came.

    Beyond a double's range (``1e400``) is refused, as by orjson: most clients would
    read it back as Infinity, which JSON cannot carry.
    """
    number = float(text)
    if math.isinf(number):
        raise JSONError(f"number {text} is out of range")
    if Decimal(repr(number)) == Decimal(text):
        return number
    return orjson.Fragment(text.encode())


def _exact_int(text: str) -> int:
    """An integer, refused with a clear message beyond ``MAX_INT_DIGITS`` digits (Python's own
    error names ``sys.set_int_max_str_digits``, which means nothing to a client)."""
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise JSONError(f"number too long: integers are limited to {MAX_INT_DIGITS} digits")
    return int(text)


_exact_decoder = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_exact_number, parse_int=_exact_int
)


def loads(data: bytes | str, *, max_depth: int | None = MAX_DEPTH) -> Any:
    """Parse JSON text; raises JSONError with a message fit for a client.

    ``max_depth`` None skips the depth check (for input kvd wrote itself).
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        if needs_exact_parse(raw):
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
    try:  # an integer beyond 64 bits, which orjson refuses: written as its digits
        return memoryview(orjson.dumps(_big_integers_as_text(value))).tobytes()
    except orjson.JSONEncodeError as exc:
        raise JSONError(f"value cannot be encoded as JSON: {exc}") from None


_INT64 = range(-(2**63), 2**64)  # orjson writes ints in this range (unsigned up to 2**64 - 1)


def _big_integers_as_text(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _big_integers_as_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_big_integers_as_text(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        return orjson.Fragment(str(value).encode())
    return value


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
