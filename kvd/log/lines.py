"""A segment file read as whole lines: what the reader and the replay helper share.

A raw newline only ever ends a record (JSON escapes the ones in strings), so
a byte offset just after one is where a record begins.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

_FIND_BYTES = 64 * 1024


def line_start(file: BinaryIO, at: int) -> int:
    """Where the first line beginning at or after byte ``at`` begins (the file's size if none).

    The reader and the helper both cut at these offsets, so every line is read
    by exactly one of them.
    """
    if at == 0:
        return 0
    file.seek(at - 1)
    position = at - 1
    while data := file.read(_FIND_BYTES):
        found = data.find(b"\n")
        if found >= 0:
            return position + found + 1
        position += len(data)
    return position


def line_blocks(file: BinaryIO, start: int, stop: int | None, block_bytes: int) -> Iterator[bytes]:
    """Bytes ``start`` (a line's start) to ``stop`` (another, or None: the end) in blocks
    of whole lines, about ``block_bytes`` each; an unterminated rest comes last, alone."""
    file.seek(start)
    position, carry = start, b""
    while block := file.read(block_bytes if stop is None else min(block_bytes, stop - position)):
        position += len(block)
        data = carry + block
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut:
            yield data[:cut]
    if carry:
        yield carry
