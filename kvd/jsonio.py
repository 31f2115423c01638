"""JSON in and out: orjson on the fast path, exact for integers of any size.

orjson reads integers beyond 64 bits as floats and refuses to write them, so
a body holding a run of 19 or more digits goes through the standard library,
which keeps them exact. Both paths reject NaN, Infinity and other non-JSON
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

_LONG_DIGIT_RUN = re.compile(rb"\d{19}")


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
        if _LONG_DIGIT_RUN.search(raw):
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
    """Compact UTF-8 JSON, the form whose length is a value's size."""
    try:
        return orjson.dumps(value)
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
