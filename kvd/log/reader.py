"""Read a journal directory back, checking every checksum and the chain.

The reader sets no policy: it yields good records and reports what it finds
after them. A torn tail (an unterminated last line, or NUL padding, in the
last segment) is reported in ``torn_tail``; anything else wrong raises
JournalCorrupt naming the file, the byte offset and the sequence number the
bad record should have had. The caller decides whether to cut or stop.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kvd.log.format import (
    GENESIS_HASH,
    SEGMENT_SUFFIX,
    Record,
    RecordError,
    decode_record,
    has_hash_trailer,
)
from kvd.log.lines import line_blocks, line_start
from kvd.log.scan_ahead import ScanAhead, plan_chunks
from kvd.log.seal import PutRun, SealedRun, read_seal, seal_path
from kvd.log.simple_puts import Run, SimplePuts, check_run, split_block

_BLOCK_BYTES = 1024 * 1024  # read at a time; lines are split out of each block
_RECORD_START = b'{"v":'  # how every record begins (format.encode_record)


CHAIN_BROKEN = "hash chain broken"


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


def segment_first_seq(path: Path) -> int:
    """The first sequence number a segment file may hold (from its name)."""
    return int(path.name[: -len(SEGMENT_SUFFIX)])


def segments_from(segments: list[Path], seq: int) -> list[Path]:
    """The segments (in order) that may hold records at or after ``seq``: a segment
    ends where the next one's first seq begins, and the last one is open-ended."""
    return [
        path for index, path in enumerate(segments)
        if index + 1 == len(segments) or segment_first_seq(segments[index + 1]) > seq
    ]


class JournalReader:
    """Iterate the records of segment files, oldest first, checking every link.

    ``segments`` defaults to every segment in ``directory``. Records are
    yielded from ``start_seq`` on, the first of them chained to
    ``start_hash`` (a snapshot's head). When the first segment begins before
    ``start_seq`` (a snapshot taken in the middle of it), its earlier records
    are read and checked but not yielded, and the one at ``start_seq - 1``
    must carry ``start_hash``. ``start_hash`` None: the record before is not
    known, so the first record read is not linked back.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        segments: list[Path] | None = None,
        start_seq: int = 1,
        start_hash: str | None = GENESIS_HASH,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.segments = segments if segments is not None else list_segments(self.directory)
        self.start_seq = start_seq
        self.start_hash = start_hash
        self.last_seq = start_seq - 1
        self.last_hash: str | None = start_hash
        if self.segments and segment_first_seq(self.segments[0]) < start_seq:
            self.last_seq = segment_first_seq(self.segments[0]) - 1
            self.last_hash = None  # the record before is not at hand
        self.torn_tail: TornTail | None = None
        self.bytes_read = 0
        self.last_line: bytes | None = None  # the last good record's line, newline included
        self.helper_chunks = 0  # chunks a helper process checked (scan_ahead.py)
        self.sealed: list[Path] = []  # segments whose runs came from their seals (seal.py)
        self.unsealed: list[Path] = []  # finished segments read without one

    def records(self) -> Iterator[Record]:
        """Every record, fully decoded (what the audit tools and the history need)."""
        yield from self.items(simple_puts=False)  # type: ignore[misc]  # Records only

    def items(self, *, simple_puts: bool = True) -> Iterator[Record | PutRun]:
        """Records, with runs of simple puts as ``SimplePuts`` (or ``SealedRun`` from a seal).

        Start-up replay takes this form: a simple put needs no Record, and
        recognising a block of them by their bytes is several times faster
        than decoding each (``simple_puts.py``); on a large journal a helper
        process checks the later part meanwhile (``scan_ahead.py``). Every
        check still runs: a run the fast path declines is decoded in full,
        line by line. A finished segment with a seal that still matches it is
        read from the seal (``seal.py``), and the helper gets none of it.
        """
        sealed = {path for path in self.segments[:-1] if seal_path(path).exists()} if simple_puts else set()
        chunks = plan_chunks([path for path in self.segments if path not in sealed]) if simple_puts else []
        ahead = ScanAhead(chunks) if chunks else None
        self.helper_chunks = len(chunks)
        try:
            for index, path in enumerate(self.segments):
                is_last = index == len(self.segments) - 1
                if path in sealed and (seal := read_seal(path)) is not None:
                    yield from self._read_sealed(path, seal.pieces())
                    del seal  # and its buffer (some MiB), before the next one is read
                    continue
                if simple_puts and not is_last:
                    self.unsealed.append(path)
                yield from self._read_segment(path, is_last, simple_puts, ahead)
        finally:
            if ahead is not None:
                ahead.close()

    def _read_segment(
        self, path: Path, is_last: bool, simple_puts: bool, ahead: ScanAhead | None
    ) -> Iterator[Record | PutRun]:
        handoff = ahead.first_start(path) if ahead is not None else None
        try:
            with open(path, "rb") as file:
                stop = line_start(file, handoff) if handoff is not None else None
                offset = yield from self._read_range(file, path, 0, stop, is_last, simple_puts)
                for chunk, scan in ahead.scans(path) if ahead is not None else ():
                    if offset is None:
                        return  # a torn tail or padding ended the segment
                    if scan is None:  # the helper failed: read the chunk alone
                        stop = line_start(file, chunk.stop)
                        offset = yield from self._read_range(file, path, offset, stop, is_last, simple_puts)
                        continue
                    assert scan.begin == offset, (scan.begin, offset)
                    offset = yield from self._read_pieces(file, path, offset, scan.pieces, is_last)
        finally:
            if ahead is not None:
                ahead.drop(path)  # what a torn tail left unread, so the next segment starts clean

    def _read_sealed(self, path: Path, pieces: Iterator[SealedRun | int]) -> Iterator[Record | PutRun]:
        """A finished segment from its seal: the seal's runs, linked here, and the
        lines between them decoded from the segment."""
        with open(path, "rb") as file:
            yield from self._read_pieces(file, path, 0, pieces, is_last=False)
        self.sealed.append(path)

    def _read_pieces(
        self, file: BinaryIO, path: Path, offset: int | None, pieces: Iterable[PutRun | int],
        is_last: bool,
    ) -> Generator[Record | PutRun, None, int | None]:
        """Checked runs (linked here before they are taken) and byte counts of lines to
        decode in full, from ``offset`` on; returns where they end, as ``_read_range``."""
        for piece in pieces:
            if offset is None:
                return None
            if not isinstance(piece, int) and self._take(piece):
                offset += piece.size
                self.bytes_read += piece.size
                yield piece
            else:
                size = piece if isinstance(piece, int) else piece.size
                offset = yield from self._read_range(
                    file, path, offset, offset + size, is_last, simple_puts=False
                )
        return offset

    def _read_range(
        self, file: BinaryIO, path: Path, offset: int, stop: int | None, is_last: bool,
        simple_puts: bool,
    ) -> Generator[Record | SimplePuts, None, int | None]:
        """The lines from ``offset`` (a line's start) to ``stop`` (one too, or None: the
        end); returns where they end, or None when a torn tail or padding ended the file."""
        for data in line_blocks(file, offset, stop, _BLOCK_BYTES):
            if not data.endswith(b"\n"):
                self._stop_at(path, offset, data, is_last)
                return None
            for piece in split_block(data) if simple_puts else [data]:
                if isinstance(piece, Run):
                    puts = check_run(piece)
                    if puts is not None and self._take(puts):
                        offset += puts.size
                        self.bytes_read += puts.size
                        yield puts
                        continue
                    lines = piece.lines()
                else:
                    lines = [line + b"\n" for line in piece.split(b"\n")[:-1]]
                for line in lines:
                    if line[:1] != b"{" and _is_padding(line):
                        file.seek(offset)
                        self._stop_at(path, offset, file.read(), is_last)
                        return None
                    record = self._check(path, offset, line)
                    offset += len(line)
                    self.bytes_read += len(line)
                    if record.seq >= self.start_seq:
                        yield record
        return offset

    def _take(self, puts: PutRun) -> bool:
        """Whether the checked run continues the chain from a known record (and so is read)."""
        if self.last_hash is None or self.last_seq < self.start_seq - 1:
            return False  # records before start_seq, or the link back is not known
        if not puts.follows(self.last_seq + 1, self.last_hash):
            return False
        self.last_seq += len(puts)
        self.last_hash = puts.head.decode()
        self.last_line = puts.last_line
        return True

    def _check(self, path: Path, offset: int, line: bytes) -> Record:
        """Decode one line in full and check its place in the chain."""
        expected = self.last_seq + 1
        try:
            record = decode_record(line)
        except RecordError as exc:
            raise JournalCorrupt(path, offset, expected, str(exc)) from None
        if record.seq != expected:
            raise JournalCorrupt(path, offset, expected, f"sequence {record.seq}, expected {expected}")
        if self.last_hash is not None and record.prev != self.last_hash:
            raise JournalCorrupt(path, offset, expected, CHAIN_BROKEN)
        if (
            record.seq == self.start_seq - 1
            and self.start_hash is not None
            and record.hash != self.start_hash
        ):
            raise JournalCorrupt(path, offset, expected, "hash differs from the snapshot's head")
        self.last_seq = record.seq
        self.last_hash = record.hash
        self.last_line = line
        return record

    def _stop_at(self, path: Path, offset: int, rest: bytes, is_last: bool) -> None:
        """An unterminated line or padding: a torn tail in the last segment, damage elsewhere."""
        if is_last and _is_torn(rest):
            self.torn_tail = TornTail(path, offset, len(rest))
            return
        reason = "unterminated record"
        if rest[:1] in (b"\n", b"\x00") and rest.strip(b"\x00\n"):
            reason = "empty line or NUL bytes before more records"
        raise JournalCorrupt(path, offset, self.last_seq + 1, reason)


def _is_torn(rest: bytes) -> bool:
    """Whether the bytes after the last good record are what a crash mid-write leaves.

    A torn write leaves a prefix of a record (no newline), possibly followed
    by NUL padding, or the padding alone. Anything else is damage to
    acknowledged data, not a torn write: bytes that do not begin a record, a
    whole record that fails its checksum with only its newline missing, or a
    whole record followed by one byte other than the newline.
    """
    if _is_padding(rest):
        return True
    fragment = rest.rstrip(b"\x00")
    if b"\n" in rest or not (
        fragment.startswith(_RECORD_START) or _RECORD_START.startswith(fragment)
    ):
        return False
    if has_hash_trailer(rest + b"\n"):  # whole but for the newline: the write stopped one byte short
        return _decodes(rest + b"\n")
    return not has_hash_trailer(rest[:-1] + b"\n")


def _decodes(line: bytes) -> bool:
    try:
        decode_record(line)
    except RecordError:
        return False
    return True


def _is_padding(data: bytes) -> bool:
    """NUL bytes a filesystem can leave past the end after a power loss."""
    return not data.strip(b"\x00\n")
