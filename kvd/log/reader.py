"""Read a journal directory back, checking every checksum and the chain.

The reader sets no policy: it yields good records and reports what it finds
after them. A torn tail (an unterminated last line, or NUL padding, in the
last segment) is reported in ``torn_tail``; anything else wrong raises
JournalCorrupt naming the file, the byte offset and the sequence number the
bad record should have had. The caller decides whether to cut or stop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvd.log.format import GENESIS_HASH, SEGMENT_SUFFIX, Record, RecordError, decode_record


class JournalCorrupt(Exception):
    """Damage before the end of the journal; start-up must stop."""

    def __init__(self, path: Path, offset: int, seq: int, reason: str) -> None:
        super().__init__(f"journal damaged in {path} at byte {offset} (seq {seq}): {reason}")
        self.path = path
        self.offset = offset
        self.seq = seq
        self.reason = reason


@dataclass(frozen=True)
class TornTail:
    """Bytes after the last complete record of the last segment."""

    path: Path
    offset: int  # where the good data ends
    length: int  # how many bytes follow it


def list_segments(directory: Path) -> list[Path]:
    """Segment files in order (their names are zero-padded first seqs)."""
    if not directory.is_dir():
        return []
    return sorted(
        directory / name
        for name in os.listdir(directory)
        if name.endswith(SEGMENT_SUFFIX) and name[: -len(SEGMENT_SUFFIX)].isdigit()
    )


class JournalReader:
    """Iterate the records of every segment in ``directory``, oldest first."""

    def __init__(
        self, directory: Path, *, start_seq: int = 1, start_hash: str = GENESIS_HASH
    ) -> None:
        self.directory = Path(directory)
        self.segments = list_segments(self.directory)
        self.last_seq = start_seq - 1
        self.last_hash = start_hash
        self.torn_tail: TornTail | None = None
        self.bytes_read = 0

    def records(self) -> Iterator[Record]:
        for index, path in enumerate(self.segments):
            is_last = index == len(self.segments) - 1
            yield from self._read_segment(path, is_last)

    def _read_segment(self, path: Path, is_last: bool) -> Iterator[Record]:
        offset = 0
        with open(path, "rb") as file:
            for line in file:
                expected = self.last_seq + 1
                if not line.endswith(b"\n") or _is_padding(line):
                    rest = line + file.read()
                    if is_last and (b"\n" not in rest or _is_padding(rest)):
                        self.torn_tail = TornTail(path, offset, len(rest))
                        return
                    raise JournalCorrupt(path, offset, expected, "unterminated record")
                try:
                    record = decode_record(line)
                except RecordError as exc:
                    raise JournalCorrupt(path, offset, expected, str(exc)) from None
                if record.seq != expected:
                    raise JournalCorrupt(
                        path, offset, expected, f"sequence {record.seq}, expected {expected}"
                    )
                if record.prev != self.last_hash:
                    raise JournalCorrupt(path, offset, expected, "hash chain broken")
                self.last_seq = record.seq
                self.last_hash = record.hash
                offset += len(line)
                self.bytes_read += len(line)
                yield record


def _is_padding(data: bytes) -> bool:
    """NUL bytes a filesystem can leave past the end after a power loss."""
    return not data.strip(b"\x00\n")
