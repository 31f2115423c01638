"""``kvd journal ... --nats URL --stream NAME``: a NATS-backed store, exported into a data directory.

The auditor commands read a data directory. For a store whose journal lives
in NATS JetStream (``kvd/log/nats_stream.py`` has the layout), the stream is
exported into a directory laid out exactly as a file store's, and the
command runs on that, unchanged:

- the newest snapshot at the top level, older snapshots in ``archive/``;
- the records after the newest snapshot in top-level segments, the records
  up to it in ``archive/`` segments (so with ``archive`` off, where the
  nodes purge the stream up to the newest snapshot, there usually are none).
  One exception: when the stream starts inside the message that holds the
  newest snapshot's record (a purge that kept that message), and nothing
  exported links back to its first record, the lines up to the snapshot go
  to a top-level segment, as a file store keeps a segment a compaction has
  yet to retire: with nothing before them they are no archived history, and
  ``verify`` takes an unlinked archived start for records removed;
- segments end at message boundaries once they hold ``SEGMENT_BYTES``, and
  always right after the newest snapshot's record; each is named by the seq
  of its first record, as the file journal names them;
- every message's bytes are written as stored, never decoded and encoded
  again, so ``verify`` checks the hashes the stream really holds, and a
  damaged line lands in the export as damaged as it is.

Only reads: nothing in the stream or the bucket is changed. A live stream
may be compacted while it is exported (the nodes purge its front after a new
snapshot); the export notices the stream's first message moving and starts
again, at most ``EXPORT_ATTEMPTS`` times.

``nats-export.json`` in the export names the stream, the servers and, per
segment, the stream messages it holds; ``ExportSummary.message_at`` maps a
byte offset in a segment back to the message it came from.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import tempfile
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from kvd.audit.base import EXIT_FAILURE, EXIT_OK, AuditError, counted, note
from kvd.audit.progress import Progress
from kvd.audit.verify import verification_report, verify_directory
from kvd.config import Config
from kvd.log import nats_stream
from kvd.log.format import segment_name
from kvd.log.history import ARCHIVE_DIR

SEGMENT_BYTES = 64 * 1024 * 1024  # a segment ends at the first message boundary past this
EXPORT_ATTEMPTS = 3  # how often an export starts over when the stream is purged under it
MANIFEST_NAME = "nats-export.json"  # not a segment or snapshot name: the commands ignore it
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 10.0

# Every record starts {"v":1,"seq":N, (encode_record writes v and seq first). Used only to
# decide where a line goes and how a segment is named; the commands check the records.
_SEQ_PREFIX = re.compile(rb'\{"v":\d+,"seq":(\d+)[,}]')


@dataclass
class ExportedSegment:
    """One segment file of the export and the stream messages its bytes came from."""

    path: Path
    first_seq: int
    bytes: int = 0
    # Parallel arrays: message ``stream_seqs[i]``'s bytes start at ``offsets[i]`` in this file.
    stream_seqs: array = field(default_factory=lambda: array("q"))
    offsets: array = field(default_factory=lambda: array("q"))

    @property
    def first_message(self) -> int | None:
        return self.stream_seqs[0] if self.stream_seqs else None

    @property
    def last_message(self) -> int | None:
        return self.stream_seqs[-1] if self.stream_seqs else None

    def message_at(self, offset: int) -> int | None:
        """The stream sequence of the message whose bytes hold ``offset`` of this file."""
        index = bisect_right(self.offsets, offset) - 1
        return self.stream_seqs[index] if index >= 0 else None


@dataclass
class ExportSummary:
    """What ``export_stream`` wrote, and where in the stream it came from."""

    servers: list[str]
    stream: str
    directory: Path
    first_message: int = 0  # stream sequences of the first and last message read
    last_message: int = 0
    messages: int = 0  # messages read (fewer than the span when some were deleted)
    records: int = 0  # lines written
    first_seq: int | None = None  # seq of the first and last line, when they parse
    last_seq: int | None = None
    snapshots: list[nats_stream.SnapshotObject] = field(default_factory=list)
    segments: list[ExportedSegment] = field(default_factory=list)
    kept: bool = False  # exported into --keep-export DIR, which stays

    @property
    def newest_snapshot(self) -> nats_stream.SnapshotObject | None:
        return self.snapshots[-1] if self.snapshots else None

    def message_at(self, path: Path | str, offset: int) -> int | None:
        """The stream message holding byte ``offset`` of exported segment ``path`` (None: unknown)."""
        target = os.path.abspath(path)
        for segment in self.segments:
            if os.path.abspath(segment.path) == target:
                return segment.message_at(offset)
        return None

    def where(self, path: Path | str, offset: int | None) -> str | None:
        """A note naming the stream message a damaged byte of the export came from."""
        message = self.message_at(path, offset) if offset is not None else None
        if message is None:
            return None
        text = f"byte {offset} of {path} is in message {message} of stream {self.stream}"
        if not self.kept:
            text += " (--keep-export DIR keeps the exported files to inspect)"
        return text

    def describe(self) -> str:
        """One line for stderr: what was exported from where into where."""
        where = f"stream {self.stream} on {','.join(self.servers)}"
        if self.messages:
            seqs = (
                f", records {self.first_seq}..{self.last_seq}"
                if self.first_seq is not None and self.last_seq is not None else ""
            )
            span = self.last_message - self.first_message + 1
            missing = f" of {span}, {span - self.messages} deleted" if self.messages < span else ""
            held = (
                f"messages {self.first_message}..{self.last_message} "
                f"({self.messages}{missing}, {counted(self.records, 'line')}{seqs})"
            )
        else:
            held = "no messages"
        snaps = ", ".join(str(snapshot.seq) for snapshot in self.snapshots)
        snapshots = f"snapshots at seq {snaps}" if snaps else "no snapshot"
        return f"exported {where}: {held}, {snapshots}, into {self.directory}"

    def manifest(self) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "stream": self.stream,
            "bucket": nats_stream.bucket(self.stream),
            "messages": {"first": self.first_message, "last": self.last_message, "count": self.messages},
            "records": {"lines": self.records, "first_seq": self.first_seq, "last_seq": self.last_seq},
            "snapshots": [
                {"name": item.name, "seq": item.seq, "stream_seq": item.stream_seq,
                 "file": _relative(self.directory, self._snapshot_path(item))}
                for item in self.snapshots
            ],
            "segments": [
                {"file": _relative(self.directory, segment.path), "first_seq": segment.first_seq,
                 "bytes": segment.bytes, "messages": [segment.first_message, segment.last_message]}
                for segment in self.segments
            ],
        }

    def _snapshot_path(self, snapshot: nats_stream.SnapshotObject) -> Path:
        if snapshot is self.newest_snapshot:
            return self.directory / snapshot.name
        return self.directory / ARCHIVE_DIR / snapshot.name


class _StreamMoved(Exception):
    """The stream's front was purged (a compaction) while it was exported: start over."""


def export_to(
    servers: list[str], stream: str, dest: Path, *, segment_bytes: int = SEGMENT_BYTES
) -> ExportSummary:
    """``export_stream`` for synchronous callers (the CLI)."""
    return asyncio.run(export_stream(servers, stream, dest, segment_bytes=segment_bytes))


@contextmanager
def exported(
    servers: list[str], stream: str, keep: Path | None = None
) -> Iterator[ExportSummary]:
    """The stream exported into ``keep`` (left there), or into a temporary directory removed after."""
    if keep is not None:
        summary = export_to(servers, stream, prepare_keep_dir(keep))
        summary.kept = True
        yield summary
        return
    directory = Path(tempfile.mkdtemp(prefix=f"kvd-nats-{re.sub(r'[^A-Za-z0-9_-]', '_', stream)}-"))
    try:
        yield export_to(servers, stream, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def verify_action(summary: ExportSummary) -> Callable[[Path, argparse.Namespace, Config], int]:
    """``verify`` on the export, naming the stream message of every damaged byte it reports."""

    def run(directory: Path, args: argparse.Namespace, config: Config) -> int:
        result = verify_directory(directory, args.expect_head)
        for line in verification_report(result):
            print(line, flush=True)
        for finding in result.damage:
            where = summary.where(finding.file, finding.offset)
            if where is not None:
                note(where)
        return EXIT_OK if result.ok else EXIT_FAILURE

    return run


def prepare_keep_dir(path: Path) -> Path:
    """``--keep-export DIR``: created when missing; an existing one must be empty (never overwritten)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise AuditError(f"--keep-export {path} exists and is not a directory")
        if any(path.iterdir()):
            raise AuditError(f"--keep-export {path} is not empty; name a new or empty directory")
    else:
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise AuditError(f"cannot create --keep-export {path}: {exc.strerror}") from None
    return path


async def export_stream(
    servers: list[str], stream: str, dest: Path, *, segment_bytes: int = SEGMENT_BYTES
) -> ExportSummary:
    """Export stream ``stream`` and its snapshots into ``dest`` (an existing, empty directory).

    Raises AuditError when NATS cannot be reached, the stream does not exist,
    or it kept being compacted under the export.
    """
    import nats

    dest = Path(dest)
    if any(dest.iterdir()):
        raise AuditError(f"cannot export into {dest}: it is not empty")

    async def quiet(_: Exception) -> None:  # nats-py logs every failed attempt otherwise
        return None

    try:
        client = await nats.connect(
            servers=servers, connect_timeout=CONNECT_TIMEOUT_SECONDS, max_reconnect_attempts=1,
            reconnect_time_wait=0.2, error_cb=quiet, name="kvd journal",
        )
    except Exception as exc:  # noqa: BLE001 - nats-py raises OSError, TimeoutError, NoServersError, ...
        reason = str(exc) or type(exc).__name__
        raise AuditError(f"cannot reach NATS at {','.join(servers)}: {reason}") from None
    try:
        js = client.jetstream()
        for _ in range(EXPORT_ATTEMPTS):
            try:
                summary = await _export_once(js, servers, stream, dest, segment_bytes)
            except _StreamMoved:
                _empty(dest)  # only what this export wrote: the directory was empty
                continue
            (dest / MANIFEST_NAME).write_bytes(
                orjson.dumps(summary.manifest(), option=orjson.OPT_INDENT_2) + b"\n"
            )
            return summary
        raise AuditError(
            f"stream {stream} kept being compacted while it was exported; run the command again"
        )
    except BaseException:
        _empty(dest)  # no half export left behind in --keep-export DIR
        raise
    finally:
        await client.close()


async def _export_once(
    js: Any, servers: list[str], stream: str, dest: Path, segment_bytes: int
) -> ExportSummary:
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        raise AuditError(f"no stream {stream!r} on {','.join(servers)}") from None
    except ValueError as exc:  # nats-py checks the name before asking
        raise AuditError(f"--stream {stream!r}: {exc}") from None
    # The position first, the snapshots after: a purge follows its snapshot's upload, so
    # the newest snapshot listed is at least as new as any purge that already happened.
    where = nats_stream.StreamPosition(info.state.first_seq, info.state.last_seq, info.state.messages)
    store = await _bucket(js, stream)
    snapshots = await nats_stream.list_snapshots(store) if store is not None else []
    summary = ExportSummary(list(servers), stream, dest, snapshots=snapshots)
    newest = summary.newest_snapshot
    archive = dest / ARCHIVE_DIR
    try:
        if len(snapshots) > 1:
            archive.mkdir(exist_ok=True)
            for snapshot in snapshots[:-1]:
                await nats_stream.download_snapshot(store, snapshot, archive)
        if newest is not None:
            await nats_stream.download_snapshot(store, newest, dest)
    except NotFoundError:
        raise _StreamMoved from None  # compaction deleted an old snapshot after the listing
    writer = _SegmentWriter(
        dest, newest.seq if newest is not None else None, segment_bytes, summary,
        anchors={snapshot.seq for snapshot in snapshots},
    )
    progress = Progress("export", getattr(info.state, "bytes", 0) or 0)
    try:
        until = await _last_message(js, stream) if where.messages else None
        if until is not None and until >= where.first:
            writer.hint = await _first_seq_hint(js, stream, where.first)
            reader = nats_stream.messages(js, stream, where.first, until, timeout=READ_TIMEOUT_SECONDS)
            try:
                async with aclosing(reader):  # unsubscribes however the loop ends
                    async for stream_seq, data in reader:
                        if summary.messages == 0 and stream_seq != where.first:
                            raise _StreamMoved  # purged between the position and the first read
                        writer.add(stream_seq, data)
                        if not summary.messages:
                            summary.first_message = stream_seq
                        summary.last_message = stream_seq
                        summary.messages += 1
                        progress.advance(len(data))
            except TimeoutError:
                # The rest was purged under us (a compaction up to the last message), or NATS
                # stopped answering: which one, the stream's position says.
                if (await nats_stream.position(js, stream)).first != where.first:
                    raise _StreamMoved from None
                raise AuditError(
                    f"stream {stream} stopped delivering after message "
                    f"{writer.last_stream_seq or where.first - 1} of {until}; run the command again"
                ) from None
    finally:
        writer.close()
        progress.finish()
    after = await nats_stream.position(js, stream)
    if after.first != where.first:
        raise _StreamMoved  # purged while reading: the snapshot listed may not join the records read
    return summary


async def _bucket(js: Any, stream: str) -> Any:
    """The snapshot bucket, or None when there is none (no snapshot was ever taken)."""
    from nats.js.errors import NotFoundError

    try:
        return await js.object_store(nats_stream.bucket(stream))
    except NotFoundError:
        return None


async def _last_message(js: Any, stream: str) -> int | None:
    """The last message's stream sequence (None: no message).

    Not the stream's ``last_seq``: that stays when the last message is
    deleted, and reading up to it would wait for a message that never comes.
    Nor a last-by-subject get: nats-server 2.9 answers "no message found"
    once the last message was deleted. So: the first message at or after a
    point exists for every point up to the last message and for none after
    it, which a binary search finds in O(log n) requests (one when the last
    message is there, as it nearly always is).
    """
    state = (await js.stream_info(stream)).state
    if not state.messages:
        return None
    found = await _message_from(js, stream, state.last_seq)
    if found is not None:
        return found
    low, high = state.first_seq, state.last_seq  # a message at low; none at or after high
    while high - low > 1:
        middle = (low + high) // 2
        found = await _message_from(js, stream, middle)
        if found is None:
            high = middle
        else:
            low = found
    return low


async def _message_from(js: Any, stream: str, stream_seq: int) -> int | None:
    """The stream sequence of the first message at or after ``stream_seq``."""
    from nats.js.errors import NotFoundError

    try:
        message = await js.get_msg(stream, stream_seq, subject=nats_stream.subject(stream), next=True)
    except NotFoundError:
        return None
    return message.seq


async def _first_seq_hint(js: Any, stream: str, stream_seq: int) -> int | None:
    """Record seq of the first retained message, from its header: names the first segment
    when its first line is too damaged to read a seq from."""
    try:
        return (await nats_stream.record_range(js, stream, stream_seq))[0]
    except Exception:  # noqa: BLE001 - a missing or bad header: only a hint
        return None


def _empty(directory: Path) -> None:
    """Remove what an earlier attempt wrote (the directory was empty when the export began)."""
    for entry in list(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _relative(base: Path, path: Path) -> str:
    return str(path.relative_to(base))


def _line_seq(line: bytes) -> int | None:
    match = _SEQ_PREFIX.match(line)
    return int(match.group(1)) if match else None


class _SegmentWriter:
    """Writes messages' bytes into segment files: ``archive/`` up to ``boundary``, then the top level."""

    def __init__(
        self, dest: Path, boundary: int | None, limit: int, summary: ExportSummary,
        anchors: set[int] | None = None,
    ) -> None:
        self.dest = dest
        self.boundary = boundary  # the newest snapshot's seq; None: every record is live
        self.limit = limit
        self.summary = summary
        self.anchors = anchors or set()  # the exported snapshots' seqs: records can follow them
        self.live = boundary is None
        self.kept = False  # lines up to the boundary go to the top level too (see ``_keeps``)
        self.hint: int | None = None  # the seq the next line should have, when known
        self.last_stream_seq: int | None = None
        self._file: IO[bytes] | None = None
        self._segment: ExportedSegment | None = None

    def add(self, stream_seq: int, data: bytes) -> None:
        if not data:
            return
        if self._segment is not None and self._segment.bytes >= self.limit:
            self._close_segment()  # a message boundary past the size: the next segment starts here
        if self.live:
            self._write(stream_seq, data, self._count_lines(data))
        else:
            if not self.summary.segments and self._keeps(data):
                self.kept = True
            self._add_archived(stream_seq, data)
        self.last_stream_seq = stream_seq

    def _add_archived(self, stream_seq: int, data: bytes) -> None:
        """Before the boundary: whole messages to ``archive/``; the one that crosses it is split."""
        assert self.boundary is not None
        last = _line_seq(nats_stream.last_line(data))
        if last is not None and last <= self.boundary:
            self._write(stream_seq, data, self._count_lines(data))
            return
        lines = nats_stream.lines(data)
        archived: list[bytes] = []
        expected = self.hint
        for index, line in enumerate(lines):
            seq = _line_seq(line)
            seq = seq if seq is not None else expected
            if seq is not None and seq > self.boundary:
                if archived:
                    self._write(stream_seq, b"".join(archived), len(archived))
                self._go_live()
                rest = lines[index:]
                self._write(stream_seq, b"".join(rest), len(rest))
                return
            archived.append(line)
            expected = seq + 1 if seq is not None else None
        self._write(stream_seq, data, len(lines))

    def _keeps(self, data: bytes) -> bool:
        """Whether the first message holds the boundary's record with nothing to link its
        first line to: a purge up to the newest snapshot kept that message. Its lines up to
        the snapshot are what the snapshot covers, not archived history."""
        assert self.boundary is not None
        first = _line_seq(data)
        last = _line_seq(nats_stream.last_line(data))
        if first is None or last is None or first == 1 or first - 1 in self.anchors:
            return False
        return first <= self.boundary <= last

    def _go_live(self) -> None:
        self._close_segment()
        self.live = True

    def _count_lines(self, data: bytes) -> int:
        return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)

    def _write(self, stream_seq: int, data: bytes, lines: int) -> None:
        first = _line_seq(data)
        if self._segment is None:
            self._open_segment(first if first is not None else (self.hint or 1))
        assert self._file is not None and self._segment is not None
        segment = self._segment
        if not segment.stream_seqs or segment.stream_seqs[-1] != stream_seq:
            segment.stream_seqs.append(stream_seq)
            segment.offsets.append(segment.bytes)
        self._file.write(data)
        segment.bytes += len(data)
        summary = self.summary
        summary.records += lines
        if summary.first_seq is None:
            summary.first_seq = first if first is not None else self.hint
        last = _line_seq(nats_stream.last_line(data))
        if last is None and self.hint is not None:
            last = self.hint + lines - 1
        if last is not None:
            summary.last_seq = last
        self.hint = last + 1 if last is not None else None

    def _open_segment(self, first_seq: int) -> None:
        directory = self.dest if self.live or self.kept else self.dest / ARCHIVE_DIR
        directory.mkdir(exist_ok=True)
        before = [segment.first_seq for segment in self.summary.segments]
        if before and first_seq <= max(before) and self.hint is not None:
            first_seq = self.hint  # a damaged seq would sort this segment before its predecessor
        while (directory / segment_name(first_seq)).exists():
            first_seq += 1  # keep every byte; the commands report the damage
        path = directory / segment_name(first_seq)
        self._file = open(path, "xb")  # noqa: SIM115 - closed by _close_segment
        self._segment = ExportedSegment(path, first_seq)
        self.summary.segments.append(self._segment)

    def _close_segment(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._segment = None

    def close(self) -> None:
        self._close_segment()
