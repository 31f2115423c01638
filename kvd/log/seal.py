"""Seals: what start-up would read out of a finished segment, kept beside it.

A segment stops changing once the journal rolls to the next one. A *seal*
(``<first seq>.seal`` next to ``<first seq>.jsonl``) then keeps what
replaying it comes to: for each run of simple puts (checked: every SHA-256,
every link inside the run) each key's last value and its revision, in key
order, and the byte counts of the lines between runs. Start-up takes a sealed
segment's runs from the seal instead of splitting and hashing every line
again, and stores each key once; keys that come in order, and are allocated
in order, also make the sort for the index a cheap merge. 1M records load in
about a third of the time (docs/benchmarks.md).

A seal only ever saves time; it never decides what start-up accepts:

- it is used only when the segment still has the size and the CRC-32 the
  seal recorded (the segment is read once for that: about 0.1 s a 64 MiB),
  and when its own CRC-32 matches, so a damaged or stale seal, or a segment
  changed since, is read the slow way, which names any damage exactly;
- each run is linked to the record before it by the reader
  (``SimplePuts.follows``), as the replay helper's runs are, and the lines
  between runs are decoded from the segment itself;
- the newest segment, which a crash may have torn, is never read from one.

Seals are written by a separate process (``python -c ... _sealer_main``,
niced) after each roll and, at start-up, for finished segments without one,
so building them takes no time from the event loop. They go when their
segment does (compaction), and start-up removes any left without one.
``kvd journal verify`` never reads them: an auditor's check reads every record.

The file: ``kvd-seal 1``, the CRC-32 of the rest of the file in hex, a
newline; one JSON header line (the segment's name, size and CRC-32, and one
entry per piece: a run's seqs, hashes and sizes, or a byte count of other
lines); then the payload, for each run its last line and its batches: the keys
joined by newlines (no key a simple put holds contains one), a struct format
of the values' lengths, and the values, each followed by its revision.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import orjson

from kvd.log.format import SEGMENT_SUFFIX
from kvd.log.scan_ahead import Chunk, helper_command, scan_chunk
from kvd.log.simple_puts import REVISION, SimplePuts
from kvd.log.snapshot import (
    SNAPSHOT_PREFIX,
    TEMP_SUFFIX,
    EntryBatch,
    SnapshotCorrupt,
    SnapshotHeader,
    fsync_directory,
    read_snapshot_batches,
)

log = logging.getLogger(__name__)

SEAL_SUFFIX = ".seal"
_MAGIC = b"kvd-seal 1 "  # then the CRC-32 of the rest of the file, in hex, and a newline
_CRC_READ_BYTES = 8 * 1024 * 1024
BATCH_KEYS = 65536  # a run's keys read at once at start-up: a few MiB of values
RUN_BYTES = 16 * 1024 * 1024  # of segment a run covers at most: what the sealer holds at once
SEALER_NICE = 10  # the sealer yields the CPU to the server it runs beside
SEALER_EXIT_SECONDS = 2.0  # how long a sealer told to stop may take to remove its temporary files


def seal_path(segment: Path) -> Path:
    return segment.with_name(segment.name[: -len(SEGMENT_SUFFIX)] + SEAL_SUFFIX)


def file_crc(path: Path, size: int, crc: int = 0) -> int | None:
    """CRC-32 of the file's first ``size`` bytes (a segment, a snapshot, a seal's payload),
    continuing ``crc``; None when the file is shorter.

    Into one buffer, a few MiB at a time: a new bytes object per read would
    leave free but resident memory behind at start-up.
    """
    left = size
    buffer = memoryview(bytearray(_CRC_READ_BYTES))
    with open(path, "rb", buffering=0) as file:
        while left:
            got = file.readinto(buffer[: min(_CRC_READ_BYTES, left)])
            if not got:
                return None
            crc = zlib.crc32(buffer[:got], crc)
            left -= got
    return crc


class RunEntry(NamedTuple):
    """How the header describes a run: linked simple puts with no other line between."""

    first_seq: int
    records: int
    prev: str  # the hash the first record chains to
    head: str  # the last record's hash
    size: int  # bytes of the run's lines in the segment
    line_size: int  # the last line, first in the run's payload
    batches: list  # [keys, keys_size, format_size, values_size] for each batch that follows


class BatchEntry(NamedTuple):
    """One batch of a run's net effect; its columns follow in this order."""

    keys: int
    keys_size: int  # the keys in key order, joined by newlines, UTF-8
    format_size: int  # a struct format of the values' lengths ("110s112s..."), ASCII
    values_size: int  # each key's last value followed by its revision (REVISION)


@dataclass(frozen=True)
class SealedRun:
    """A run of simple puts as its seal keeps it: for each key its last value and
    that value's revision, in key order, read a batch at a time.

    The reader links it to the record before, as it does ``SimplePuts``; the
    store takes its ``entries``. Storing a key's last value alone gives the state
    that storing each value in turn does, and keys in key order, allocated in
    that order, make start-up's sort for the index a merge of a few runs that
    are each in order in memory too (0.2 s for 1M keys against 1 s).
    """

    path: Path
    offset: int  # where the run's payload starts in the seal
    first_seq: int
    records: int
    prev: bytes
    head: bytes
    size: int
    last_line: bytes
    batches: tuple[BatchEntry, ...]
    values_buffer: _Buffer  # the seal's, shared by its runs

    def __len__(self) -> int:
        return self.records

    def follows(self, seq: int, last_hash: str) -> bool:
        return self.first_seq == seq and self.prev == last_hash.encode()

    def entries(self) -> Iterator[tuple[list[str], tuple[bytes, ...]]]:
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            for batch in self.batches:
                keys = file.read(batch.keys_size).decode().split("\n")
                values_format = file.read(batch.format_size)
                yield keys, struct.Struct(values_format).unpack(self.values_buffer.read(file, batch.values_size))


class _Buffer:
    """One buffer a seal's values columns are read into in turn, each used before the next.

    A new bytes object per column (several MiB) would leave that much free but
    resident memory behind each time, and a new buffer per run costs its
    zeroing and page faults (0.2 s for 1M records).
    """

    def __init__(self, size: int) -> None:
        self._view = memoryview(bytearray(size))

    def read(self, file: BinaryIO, size: int) -> memoryview:
        """The next ``size`` bytes of ``file``, valid until the next read."""
        view = self._view[:size]
        if file.readinto(view) != size:
            raise ValueError("cut short")
        return view


PutRun = SimplePuts | SealedRun  # a run of simple puts, from the journal's lines or from a seal


@dataclass(frozen=True)
class Seal:
    """A seal found whole and matching its segment."""

    path: Path
    pieces_header: list
    payload_start: int
    values_buffer: _Buffer

    def pieces(self) -> Iterator[SealedRun | int]:
        """The segment's lines in order, as the replay helper gives a chunk's
        (``scan_ahead.ChunkScan``): runs, and byte counts to decode from the file."""
        offset = self.payload_start
        with open(self.path, "rb") as file:
            for piece in self.pieces_header:
                if isinstance(piece, int):
                    yield piece
                    continue
                run = RunEntry(*piece)
                batches = tuple(BatchEntry(*batch) for batch in run.batches)
                file.seek(offset)
                last_line = file.read(run.line_size)
                yield SealedRun(
                    self.path, offset + run.line_size, run.first_seq, run.records, run.prev.encode(),
                    run.head.encode(), run.size, last_line, batches, self.values_buffer,
                )
                offset += run.line_size + sum(batch.keys_size + batch.format_size + batch.values_size for batch in batches)


def read_seal(segment: Path) -> Seal | None:
    """The segment's seal when it is whole and still describes the segment; else None."""
    checked = _read_checked(segment, _check_runs)
    if checked is None:
        return None
    header, payload_start, values_buffer = checked
    return Seal(seal_path(segment), header["pieces"], payload_start, values_buffer)


def _read_checked(
    sealed: Path, check_columns: Callable[[BinaryIO, dict, int], tuple[int, _Buffer]]
) -> tuple[dict, int, _Buffer] | None:
    """The header of ``sealed``'s seal, where its payload starts and a buffer for its
    values, when the seal is whole and ``sealed`` still has the size and CRC-32 it
    recorded; else None, with a warning saying why.

    The seal is read a column at a time, twice (``check_columns`` now, to use
    them later), not whole: a whole seal (a third of a segment's size, a
    snapshot's size) would raise start-up's peak memory.
    """
    try:
        with open(seal_path(sealed), "rb") as file:
            first = file.readline()
            if not first.startswith(_MAGIC):
                raise ValueError("not a seal")
            header_line = file.readline()
            header = orjson.loads(header_line)
            payload_start = file.tell()
            crc, values_buffer = check_columns(file, header, zlib.crc32(header_line))
            if file.read(1) or crc != int(first[len(_MAGIC) :], 16):
                raise ValueError("damaged")
            if header["file"] != sealed.name:
                raise ValueError(f"it describes {header['file']}")
        if sealed.stat().st_size != header["size"] or file_crc(sealed, header["size"]) != header["crc32"]:
            log.warning("%s changed since it was sealed: reading it in full", sealed.name)
            return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the seal of %s (%s): reading it in full", sealed.name, exc)
        return None
    except (ValueError, KeyError, TypeError, IndexError, struct.error, orjson.JSONDecodeError) as exc:
        log.warning("ignoring the seal of %s (%s): reading it in full", sealed.name, exc)
        return None
    return header, payload_start, values_buffer


def _check_runs(file: BinaryIO, header: dict, crc: int) -> tuple[int, _Buffer]:
    """That the pieces cover the segment and each batch's columns hold its count of keys
    (ValueError if not); returns the CRC-32 continued over them, and the values' buffer."""
    pieces = header["pieces"]
    runs = [RunEntry(*piece) for piece in pieces if not isinstance(piece, int)]
    if sum(piece for piece in pieces if isinstance(piece, int)) + sum(run.size for run in runs) != header["size"]:
        raise ValueError("its pieces do not add up to the segment")
    batches_of_runs = [[BatchEntry(*batch) for batch in run.batches] for run in runs]
    values_buffer = _Buffer(max((batch.values_size for batches in batches_of_runs for batch in batches), default=0))
    for run, batches in zip(runs, batches_of_runs, strict=True):
        last_line = file.read(run.line_size)
        crc = zlib.crc32(last_line, crc)
        for batch in batches:
            keys, values_format = file.read(batch.keys_size), file.read(batch.format_size)
            values = values_buffer.read(file, batch.values_size)
            if (
                len(keys) != batch.keys_size or keys.count(b"\n") != batch.keys - 1
                or not _values_format_fits(values_format, batch)
            ):
                raise ValueError(f"the run from seq {run.first_seq} does not hold its keys")
            for column in (keys, values_format, values):
                crc = zlib.crc32(column, crc)
        if len(last_line) != run.line_size or sum(batch.keys for batch in batches) > run.records:
            raise ValueError(f"the run from seq {run.first_seq} does not hold its keys")
    return crc, values_buffer


def _values_format(values: list[bytes]) -> bytes:
    """The struct format a batch's values column is read back with: their lengths ("110s112s...")."""
    return "".join(map("{}s".format, map(len, values))).encode()


def _values_format_fits(values_format: bytes, batch: BatchEntry | SnapshotBatchEntry) -> bool:
    """Whether a values format read back is whole, names only strings, one per key,
    and describes exactly the batch's values column."""
    return (
        len(values_format) == batch.format_size
        and not values_format.translate(None, b"0123456789s")  # only lengths of strings
        and values_format.count(b"s") == batch.keys
        and struct.Struct(values_format).size == batch.values_size
    )


def write_seal(segment: Path) -> Path:
    """Read, check and seal one finished segment (in the sealer process).

    A stretch of the segment (RUN_BYTES) at a time, each run within one, so
    the process holds one stretch's puts at once (a whole 64 MiB segment's
    took 150 MiB).
    """
    size = segment.stat().st_size
    crc = file_crc(segment, size)

    def runs(payload: BinaryIO) -> dict:
        pieces = [
            _write_run(payload, piece) if isinstance(piece, SimplePuts) else piece
            for start in range(0, size, RUN_BYTES)
            for piece in _joined(scan_chunk(Chunk(segment, start, min(start + RUN_BYTES, size))).pieces)
        ]
        return {"file": segment.name, "size": size, "crc32": crc, "pieces": pieces}

    return _write_file(seal_path(segment), runs)


def _write_file(target: Path, write_payload: Callable[[BinaryIO], dict]) -> Path:
    """Write a seal: ``write_payload`` writes the payload and returns the header. The
    payload goes to a temporary file first, since the header comes before it."""
    temp, payload_temp = (target.with_name(target.name + suffix) for suffix in (TEMP_SUFFIX, ".payload" + TEMP_SUFFIX))
    try:
        with open(payload_temp, "w+b") as payload:
            header = orjson.dumps(write_payload(payload)) + b"\n"
            payload.flush()
            crc = file_crc(payload_temp, payload.tell(), zlib.crc32(header))
            payload.seek(0)
            with open(temp, "wb") as out:
                out.write(_MAGIC + b"%08x\n" % crc + header)
                shutil.copyfileobj(payload, out)
                out.flush()
                os.fsync(out.fileno())
        os.replace(temp, target)
    finally:
        payload_temp.unlink(missing_ok=True)
        temp.unlink(missing_ok=True)  # a full disk, say: nothing half-written is left
    fsync_directory(target.parent)
    return target


def _write_run(payload: BinaryIO, run: SimplePuts) -> list:
    """Write a run's payload (its last line, then its keys' last values, in key order,
    in batches); returns its header entry."""
    assert run.values is not None
    payload.write(run.last_line)
    latest = {key: position for position, key in enumerate(run.keys)}  # a key's last write
    keys = sorted(latest)
    batches = []
    for start in range(0, len(keys), BATCH_KEYS):
        batch = keys[start : start + BATCH_KEYS]
        values = [run.values[at] + REVISION.pack(run.first_seq + at) for at in map(latest.__getitem__, batch)]
        columns = ["\n".join(batch).encode(), _values_format(values), b"".join(values)]
        for column in columns:
            payload.write(column)
        batches.append(list(BatchEntry(len(batch), *map(len, columns))))
    return list(RunEntry(
        run.first_seq, len(run), run.prev.decode(), run.head.decode(), run.size, len(run.last_line), batches,
    ))


def _joined(pieces: list[SimplePuts | int]) -> Iterator[SimplePuts | int]:
    """Consecutive runs that link up, joined: the lines between other lines, as one run."""
    current: SimplePuts | None = None
    for piece in pieces:
        if (
            isinstance(piece, SimplePuts) and current is not None
            and piece.follows(current.first_seq + len(current), current.head.decode())
        ):
            current.keys += piece.keys
            current.values += piece.values
            current.head, current.size, current.last_line = piece.head, current.size + piece.size, piece.last_line
            continue
        if current is not None:
            yield current
            current = None
        if isinstance(piece, SimplePuts):
            current = piece
        else:
            yield piece
    if current is not None:
        yield current


# --- snapshots ----------------------------------------------------------------------


class SnapshotBatchEntry(NamedTuple):
    """One batch of a snapshot's seal; its columns follow in this order."""

    keys: int
    keys_size: int  # the keys as a JSON array (a snapshot's keys may hold anything)
    format_size: int  # a struct format of the values' lengths, ASCII
    values_size: int  # the values' compact JSON, one after another
    revisions_size: int  # 8-byte little-endian revisions
    expiries_size: int  # a JSON array of expiry times or nulls; empty when no key has one


def write_snapshot_seal(snapshot: Path) -> Path:
    """Read a snapshot, checking its digest, and seal it (in the sealer process):
    its entries in the batches start-up restores, without a line to parse."""
    size = snapshot.stat().st_size
    crc = file_crc(snapshot, size)

    def batches(payload: BinaryIO) -> dict:
        header, entries = read_snapshot_batches(snapshot)  # raises at the end if the digest differs
        written = []
        for batch in entries:
            revisions = array("Q", batch.revisions)
            if sys.byteorder == "big":
                revisions.byteswap()
            columns = [
                orjson.dumps(batch.keys), _values_format(batch.values), b"".join(batch.values),
                revisions.tobytes(),
                orjson.dumps(batch.expiries) if batch.expiries is not None else b"",
            ]
            for column in columns:
                payload.write(column)
            written.append(list(SnapshotBatchEntry(len(batch), *map(len, columns))))
        return {
            "file": snapshot.name, "size": size, "crc32": crc,
            "header": [header.seq, header.ts, header.head, header.keys], "batches": written,
        }

    return _write_file(seal_path(snapshot), batches)


def read_snapshot_seal(snapshot: Path) -> tuple[SnapshotHeader, Iterator[EntryBatch]] | None:
    """The snapshot's header and entries from its seal, when the seal is whole and the
    snapshot still has the size and CRC-32 it recorded; else None (load the snapshot)."""
    checked = _read_checked(snapshot, _check_snapshot_batches)
    if checked is None:
        return None
    header, payload_start, values_buffer = checked
    batches = [SnapshotBatchEntry(*batch) for batch in header["batches"]]

    def entries() -> Iterator[EntryBatch]:
        with open(seal_path(snapshot), "rb") as file:
            file.seek(payload_start)
            for batch in batches:
                keys = orjson.loads(file.read(batch.keys_size))
                values_format = file.read(batch.format_size)
                values = struct.Struct(values_format).unpack(values_buffer.read(file, batch.values_size))
                revisions = _revisions(file.read(batch.revisions_size))
                expiries = orjson.loads(file.read(batch.expiries_size)) if batch.expiries_size else None
                yield EntryBatch(keys, values, revisions, expiries)

    return SnapshotHeader(*header["header"]), entries()


def _check_snapshot_batches(file: BinaryIO, header: dict, crc: int) -> tuple[int, _Buffer]:
    """That the batches hold the snapshot's count of entries (ValueError if not); returns
    the CRC-32 continued over them, and the values' buffer."""
    batches = [SnapshotBatchEntry(*batch) for batch in header["batches"]]
    if sum(batch.keys for batch in batches) != header["header"][3]:
        raise ValueError("its batches do not hold the snapshot's entries")
    values_buffer = _Buffer(max((batch.values_size for batch in batches), default=0))
    for batch in batches:
        crc = _check_snapshot_batch(file, batch, values_buffer, crc)
    return crc, values_buffer


def _check_snapshot_batch(file: BinaryIO, batch: SnapshotBatchEntry, values_buffer: _Buffer, crc: int) -> int:
    """That a batch's columns hold its count of entries (ValueError if not); returns the
    CRC-32 continued over them."""
    keys, values_format = file.read(batch.keys_size), file.read(batch.format_size)
    values = values_buffer.read(file, batch.values_size)
    revisions, expiries = file.read(batch.revisions_size), file.read(batch.expiries_size)
    if (
        len(keys) != batch.keys_size or len(orjson.loads(keys)) != batch.keys
        or not _values_format_fits(values_format, batch)
        or len(revisions) != 8 * batch.keys
        or len(expiries) != batch.expiries_size or (expiries and len(orjson.loads(expiries)) != batch.keys)
    ):
        raise ValueError(f"a batch of {batch.keys} entries does not hold them")
    for column in (keys, values_format, values, revisions, expiries):
        crc = zlib.crc32(column, crc)
    return crc


def _revisions(data: bytes) -> array:
    revisions = array("Q")
    revisions.frombytes(data)
    if sys.byteorder == "big":
        revisions.byteswap()
    return revisions


def remove_orphan_seals(directory: Path) -> None:
    """Seals whose segment is gone (retired while its sealer ran, or moved by repair)."""
    for name in os.listdir(directory):
        if name.endswith(SEAL_SUFFIX):
            segment = directory / (name[: -len(SEAL_SUFFIX)] + SEGMENT_SUFFIX)
            if not segment.exists():
                os.unlink(directory / name)


class Sealer:
    """Seals finished segments in a separate process, one process at a time.

    Segments handed over while a process runs wait for it, then go to the
    next one together: with small segments, rolls can come faster than a
    process starts (about 0.15 s).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Path] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._running = False  # a thread runs the processes
        self._closed = False

    def seal(self, segments: list[Path]) -> None:
        with self._lock:
            if self._closed or not segments:
                return
            self._queue += segments
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="kvd-sealer", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch or self._closed:
                    self._running, self._process = False, None
                    return
                try:
                    process = self._process = start_sealer(batch)
                except OSError as exc:  # start-up reads these segments in full
                    log.warning("cannot start a process to seal %s: %s", batch[0].name, exc)
                    self._running = False
                    return
            process.wait()

    def close(self) -> None:
        """Stop the process still running (ours, by its handle). SIGTERM lets it remove
        the temporary files it was writing (a seal of a 64 MiB segment leaves up to
        25 MB); the next start seals the segment again. SIGKILL only if it does not
        exit in time, and then the next start removes what it left."""
        with self._lock:
            self._closed = True
            process = self._process
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=SEALER_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_sealer(segments: list[Path]) -> subprocess.Popen[bytes]:
    """A process that seals ``segments`` one after another, then exits."""
    return subprocess.Popen(
        helper_command(__name__, "_sealer_main", *map(os.fsdecode, segments)),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )


def _sealer_main(*segments: str) -> None:
    # SIGTERM (Sealer.close) ends it through SystemExit, so _write_file's cleanup runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.nice(SEALER_NICE)
    gc.disable()  # it builds many objects and keeps none between segments
    for name in segments:
        path = Path(name)
        try:
            write_snapshot_seal(path) if path.name.startswith(SNAPSHOT_PREFIX) else write_seal(path)
        except FileNotFoundError:
            pass  # retired meanwhile by a compaction
        except (OSError, SnapshotCorrupt) as exc:  # a full disk, say: start-up reads it in full
            print(f"kvd sealer: {name}: {exc}", file=sys.stderr)
