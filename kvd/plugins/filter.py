"""The built-in ``filter`` plugin: the key pattern language of ``?filter=`` and ``?key=``.

A pattern matches whole keys, case-sensitively. ``*`` and ``$`` match any run
of characters (also none), ``?`` exactly one character (one code point), ``\\``
makes the next character literal; every other character is literal.

Patterns come from clients, so matching must not backtrack: a pattern is split
at its star runs into fixed-length segments, the first anchored at the start,
the last at the end, and each middle one taken at its leftmost fit. Taking the
leftmost fit is safe because a star before the next segment can absorb whatever
an earlier choice would have left. Each search resumes where the previous one
ended, so a match costs at most O(len(key) * len(pattern)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from kvd import hookimpl
from kvd.errors import BadRequest


@dataclass(frozen=True, slots=True)
class _Segment:
    """A star-free piece of a pattern: literals and `?`, so of fixed length."""

    length: int
    literal: str | None  # the text, when the segment has no `?`: plain str search
    regex: re.Pattern[str] | None  # otherwise a fixed-length regex, `?` as `.`

    def match_at(self, key: str, pos: int) -> bool:
        """Whether the segment matches ``key`` starting exactly at ``pos``."""
        if self.literal is not None:
            return key.startswith(self.literal, pos)
        assert self.regex is not None
        return self.regex.match(key, pos) is not None

    def find(self, key: str, start: int, end: int) -> int:
        """The leftmost index where the segment fits inside ``key[start:end]``, or -1."""
        if self.literal is not None:
            return key.find(self.literal, start, end)
        assert self.regex is not None
        found = self.regex.search(key, start, end)
        return -1 if found is None else found.start()


@dataclass(frozen=True, slots=True)
class KeyPattern:
    """A compiled filter pattern (a ``kvd.model.KeyFilter``); immutable, so safe to share."""

    pattern: str
    prefix: str
    """Every matching key starts with this, so a listing scans only that sorted range."""
    _exact: str | None = field(repr=False, compare=False)
    _head: _Segment | None = field(repr=False, compare=False)
    _middle: tuple[_Segment, ...] = field(repr=False, compare=False)
    _tail: _Segment | None = field(repr=False, compare=False)
    _min_length: int = field(repr=False, compare=False)
    prefix_only: bool = False
    """Every key that starts with ``prefix`` matches (``abc*``): listings need not call ``match``."""

    def match(self, key: str) -> bool:
        """Whether the whole key matches the pattern."""
        if self._exact is not None:
            return key == self._exact
        head, tail = self._head, self._tail
        assert head is not None
        if tail is None:
            # No star: the single segment must cover the key exactly.
            return len(key) == head.length and head.match_at(key, 0)
        if len(key) < self._min_length or not head.match_at(key, 0):
            return False
        # The tail is pinned to the end; middle segments must fit between the
        # head and the tail without overlapping either.
        end = len(key) - tail.length
        if not tail.match_at(key, end):
            return False
        pos = head.length
        for segment in self._middle:
            found = segment.find(key, pos, end)
            if found < 0:
                return False
            pos = found + segment.length
        return True


def _parse(pattern: str) -> list[list[str | None]]:
    """Split ``pattern`` at its star runs into pieces of literal chars and ``None`` for ``?``.

    There is always one piece more than there are star runs; only the first
    and last piece can be empty.
    """
    pieces: list[list[str | None]] = [[]]
    chars = iter(pattern)
    after_star = False
    for char in chars:
        if char in "*$":
            if not after_star:
                pieces.append([])
            after_star = True
            continue
        after_star = False
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise BadRequest(
                    "bad filter pattern: it ends with a lone '\\' that escapes nothing;"
                    " write '\\\\' to match a backslash"
                )
            pieces[-1].append(escaped)
        else:
            pieces[-1].append(None if char == "?" else char)
    return pieces


def _segment(piece: list[str | None]) -> _Segment:
    if None not in piece:
        return _Segment(len(piece), "".join(piece), None)  # type: ignore[arg-type]
    # DOTALL: `?` matches any one character. The regex has no quantifier, so
    # each attempt is a fixed-length comparison and cannot backtrack.
    source = "".join("." if char is None else re.escape(char) for char in piece)
    return _Segment(len(piece), None, re.compile(source, re.DOTALL))


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> KeyPattern:
    """Compile a filter pattern; cached because clients repeat theirs across pages.

    Raises ``kvd.errors.BadRequest`` for a pattern ending in a lone ``\\``.
    """
    pieces = _parse(pattern)
    head_piece = pieces[0]
    literal_head = head_piece[: head_piece.index(None)] if None in head_piece else head_piece
    prefix = "".join(literal_head)  # type: ignore[arg-type]

    if len(pieces) == 1 and len(literal_head) == len(head_piece):
        # No wildcard at all: an equality test.
        return KeyPattern(pattern, prefix, prefix, None, (), None, len(prefix))
    segments = [_segment(piece) for piece in pieces]
    tail = segments[-1] if len(segments) > 1 else None
    min_length = sum(segment.length for segment in segments)
    # Literals, then one star run at the end: the prefix says it all. The common
    # listing (``orders/*``); calling match per key was most of its cost.
    prefix_only = len(pieces) == 2 and not pieces[1] and len(literal_head) == len(head_piece)
    return KeyPattern(
        pattern, prefix, None, segments[0], tuple(segments[1:-1]), tail, min_length, prefix_only
    )


class FilterPlugin:
    """Answers ``compile_filter`` with the SPEC's pattern language."""

    @hookimpl
    def compile_filter(self, pattern: str) -> KeyPattern:
        return compile_pattern(pattern)


def make_plugin(settings: dict) -> object:
    """The plugin instance; the filter plugin takes no settings, so any key is a mistake."""
    for name in settings:
        raise ValueError(f"unknown setting plugins.filter.{name}")
    return FilterPlugin()
