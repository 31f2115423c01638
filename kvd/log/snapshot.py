"""Snapshot files: the whole live state at one sequence number.

Compaction writes one so that the segments before it can be retired, and
start-up loads the newest one instead of replaying all history. A snapshot
is JSON Lines too, readable with ``jq``:

    {"v":1,"snapshot":true,"seq":S,"ts":"...","head":"<hash of record S>","keys":N}
    {"k":"<key>","r":<revision>,"x":"<expiry>","v":<value>}     one line per key, "x" optional
    {"end":true,"keys":N,"sha256":"<SHA-256 of every byte before this line>"}

``head`` ties the snapshot into the hash chain: the first record after it
has ``prev`` equal to ``head``. The trailer's digest covers the header and
every entry, so any edit, a missing line or a torn file is detected.
Values are written and read back as the exact bytes the store holds.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson

from kvd.log import faults
from kvd.log.format import FORMAT_VERSION, format_ts, parse_ts
from kvd.model import Entry

SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_SUFFIX = ".jsonl"
TEMP_SUFFIX = ".tmp"
_VALUE_SEPARATOR = b',"v":'
_TRAILER_START = b'\n{"end":'  # entry lines start {"k":, and keys cannot hold a raw newline
CHUNK_BYTES = 1024 * 1024
DIGEST_QUEUE_CHUNKS = 8  # read ahead of the digest thread at most
# An entry line whose key holds nothing JSON escapes (almost every one): its
# fields are split out of a whole chunk at once, in C. ^ keeps matches to
# whole lines, whatever a value holds.
_ENTRY_LINE = re.compile(
    rb'^\{"k":"([^"\\\x00-\x1f]*)","r":(0|[1-9][0-9]*),(?:"x":"([^"\\]*)",)?"v":(.*)\}\n',
    re.MULTILINE,
)
_ENTRY_GROUPS = 4


class SnapshotCorrupt(Exception):
    """A snapshot file fails its checks."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"snapshot {path} is damaged: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class SnapshotHeader:
    seq: int  # the state after this record
    ts: str  # that record's time
    head: str  # that record's hash
    keys: int


def snapshot_name(seq: int) -> str:
    return f"{SNAPSHOT_PREFIX}{seq:020d}{SNAPSHOT_SUFFIX}"


def snapshot_temp_path(directory: Path, seq: int) -> Path:
    """Where the snapshot ``seq`` is written before its rename."""
    return directory / (snapshot_name(seq) + TEMP_SUFFIX)


def is_snapshot_name(name: str) -> bool:
    middle = name[len(SNAPSHOT_PREFIX) : -len(SNAPSHOT_SUFFIX)]
    return name.startswith(SNAPSHOT_PREFIX) and name.endswith(SNAPSHOT_SUFFIX) and middle.isdigit()


def snapshot_seq(path: Path) -> int:
    return int(path.name[len(SNAPSHOT_PREFIX) : -len(SNAPSHOT_SUFFIX)])


def list_snapshots(directory: Path) -> list[Path]:
    """Snapshot files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(directory / name for name in os.listdir(directory) if is_snapshot_name(name))


def encode_entry(key: str, entry: Entry) -> bytes:
    meta: dict[str, object] = {"k": key, "r": entry.revision}
    if entry.expires_at is not None:
        meta["x"] = format_ts(entry.expires_at)
    return orjson.dumps(meta)[:-1] + _VALUE_SEPARATOR + entry.value + b"}\n"


def decode_entry(line: bytes) -> tuple[str, Entry]:
    """One entry line (without its newline) back to (key, Entry); the value is sliced out, not re-encoded.

    The first ``,"v":`` is the separator: the key is a JSON string, in which
    every ``"`` is escaped, and ``r``/``x`` hold a number and a timestamp.
    """
    meta_part, _, value = line.partition(_VALUE_SEPARATOR)
    if not value.endswith(b"}"):
        raise ValueError("entry line does not end its value")
    meta = orjson.loads(meta_part + b"}")
    expiry = meta.get("x")
    return meta["k"], Entry(value[:-1], int(meta["r"]), parse_ts(expiry) if expiry else None)


@dataclass(slots=True)
class EntryBatch:
    """One chunk's entries in columns: start-up stores them without building an Entry each."""

    keys: list[str]
    values: list[bytes]
    revisions: list[int]
    expiries: list[float | None] | None  # None: no entry has one

    def __len__(self) -> int:
        return len(self.keys)

    def entries(self) -> list[tuple[str, Entry]]:
        expiries = self.expiries or [None] * len(self.keys)
        return [
            (key, Entry(value, revision, expires_at))
            for key, value, revision, expires_at
            in zip(self.keys, self.values, self.revisions, expiries, strict=True)
        ]


def _decode_chunk(data: bytes) -> EntryBatch:
    """Whole entry lines (``data`` ends in a newline), in no particular order.

    Lines the pattern does not take (a key with an escape) go through
    ``_decode_entries``. Raises ValueError (or orjson's error) on a bad line.
    """
    parts = _ENTRY_LINE.split(data)
    step = _ENTRY_GROUPS + 1
    keys = list(map(bytes.decode, parts[1::step]))
    revisions = list(map(int, parts[2::step]))
    values = parts[4::step]
    stamps = parts[3::step]
    expiries = (
        [None if stamp is None else parse_ts(stamp.decode()) for stamp in stamps]
        if any(stamp is not None for stamp in stamps) else None
    )
    rest = b"".join(parts[0::step])
    if rest:
        others = _decode_entries(rest.split(b"\n")[:-1])
        keys += [key for key, _ in others]
        values += [entry.value for _, entry in others]
        revisions += [entry.revision for _, entry in others]
        if expiries is not None or any(entry.expires_at is not None for _, entry in others):
            expiries = (expiries or [None] * len(stamps)) + [entry.expires_at for _, entry in others]
    return EntryBatch(keys, values, revisions, expiries)


def _decode_entries(lines: list[bytes]) -> list[tuple[str, Entry]]:
    """Many entry lines at once: their key/revision/expiry parts parsed by one orjson call.

    Falls back to ``decode_entry`` line by line (for its precise error) when
    a line does not split as an entry line must.
    """
    parts = [line.partition(_VALUE_SEPARATOR) for line in lines]
    try:
        metas = orjson.loads(b"[" + b"},".join([part[0] for part in parts]) + b"}]")
        if len(metas) != len(parts) or not all(part[2].endswith(b"}") for part in parts):
            raise ValueError("not entry lines")
        return [
            (meta["k"], Entry(part[2][:-1], meta["r"], parse_ts(meta["x"]) if "x" in meta else None))
            for meta, part in zip(metas, parts, strict=True)
        ]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return [decode_entry(line) for line in lines]


def write_snapshot(
    directory: Path, header: SnapshotHeader, entries: Iterable[tuple[str, Entry]]
) -> Path:
    """Write atomically: a temp file, fsync, rename, fsync the directory.

    Returns the final path. A crash leaves either no snapshot or a complete
    one (plus perhaps a ``.tmp`` file, which start-up deletes).
    """
    final = directory / snapshot_name(header.seq)
    temp = snapshot_temp_path(directory, header.seq)
    try:
        _write_temp(temp, header, entries)
    except BaseException:
        temp.unlink(missing_ok=True)  # a full disk must not leave half a snapshot behind
        raise
    faults.crash_point("snapshot-written")
    sync_records_through(directory, header.seq)
    os.replace(temp, final)
    faults.crash_point("snapshot-renamed")
    fsync_directory(directory)
    return final


def _write_temp(temp: Path, header: SnapshotHeader, entries: Iterable[tuple[str, Entry]]) -> None:
    digest = hashlib.sha256()
    count = 0
    with open(temp, "wb") as file:
        first = orjson.dumps(
            {"v": FORMAT_VERSION, "snapshot": True, "seq": header.seq, "ts": header.ts,
             "head": header.head, "keys": header.keys}
        ) + b"\n"
        digest.update(first)
        file.write(first)
        chunk: list[bytes] = []
        for key, entry in entries:
            chunk.append(encode_entry(key, entry))
            count += 1
            if len(chunk) >= 4096:
                data = b"".join(chunk)
                digest.update(data)
                file.write(data)
                chunk.clear()
        data = b"".join(chunk)
        digest.update(data)
        file.write(data)
        if count != header.keys:
            raise ValueError(f"snapshot header says {header.keys} keys, {count} were written")
        file.write(orjson.dumps({"end": True, "keys": count, "sha256": digest.hexdigest()}) + b"\n")
        file.flush()
        os.fsync(file.fileno())


def read_header(path: Path) -> SnapshotHeader:
    """The first line only (cheap); the entries are checked by ``read_snapshot``."""
    with open(path, "rb") as file:
        return _parse_header(path, file.readline())


def _parse_header(path: Path, line: bytes) -> SnapshotHeader:
    try:
        fields = orjson.loads(line)
        if fields.get("v") != FORMAT_VERSION or fields.get("snapshot") is not True:
            raise ValueError("not a version 1 snapshot header")
        header = SnapshotHeader(
            int(fields["seq"]), str(fields["ts"]), str(fields["head"]), int(fields["keys"])
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotCorrupt(path, f"bad header: {exc}") from None
    if header.seq != snapshot_seq(path):
        raise SnapshotCorrupt(path, f"header seq {header.seq} differs from the file name")
    return header


def read_snapshot(path: Path) -> tuple[SnapshotHeader, Iterator[tuple[str, Entry]]]:
    """The header, and an iterator of entries that raises SnapshotCorrupt on damage.

    The digest can only be checked at the end, so a caller must treat what it
    got as void when the iterator raises.
    """
    header, batches = read_snapshot_batches(path)
    return header, (item for batch in batches for item in batch.entries())


def read_snapshot_batches(path: Path) -> tuple[SnapshotHeader, Iterator[EntryBatch]]:
    """Like ``read_snapshot``, the entries of each chunk read in columns: start-up loads millions.

    Read in large chunks and hash each chunk once: per-line reads, digest
    updates and per-entry calls cost more than decoding the entries. The
    hashing runs on a thread (SHA-256 of a large buffer lets go of the GIL),
    so on a second core it costs start-up nothing: about 0.6 s for 1M keys.
    """
    file = open(path, "rb")  # noqa: SIM115 - closed by the iterator
    first = file.readline()
    try:
        header = _parse_header(path, first)
    except SnapshotCorrupt:
        file.close()
        raise

    def batches() -> Iterator[EntryBatch]:
        digest = hashlib.sha256(first)
        queued: deque[Future[None]] = deque()  # in order: one worker
        count = 0
        rest = b""
        with file, ThreadPoolExecutor(1, thread_name_prefix="kvd-snapshot-digest") as hashing:
            while True:
                chunk = file.read(CHUNK_BYTES)
                data = rest + chunk
                if not chunk:
                    break
                end = data.rfind(b"\n") + 1
                block, rest = data[:end], data[end:]
                trailer_at = _trailer_offset(block)
                entries_part = block[:trailer_at]
                queued.append(hashing.submit(digest.update, entries_part))
                if len(queued) > DIGEST_QUEUE_CHUNKS:  # bounds the chunks held for hashing
                    queued.popleft().result()
                try:
                    batch = _decode_chunk(entries_part)
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise SnapshotCorrupt(path, f"bad entry after entry {count}: {exc}") from None
                count += len(batch)
                yield batch
                if trailer_at < len(block):
                    trailer = block[trailer_at:]
                    if trailer.count(b"\n") != 1 or rest or file.read(1):
                        raise SnapshotCorrupt(path, "data after the trailer")
                    for hashed in queued:
                        hashed.result()
                    _check_trailer(path, trailer, digest.hexdigest(), count, header)
                    return
        raise SnapshotCorrupt(path, "no trailer (file cut short)")

    return header, batches()


def _trailer_offset(block: bytes) -> int:
    """Where the trailer line starts in a block of whole lines (its length when absent)."""
    if block.startswith(_TRAILER_START[1:]):
        return 0
    found = block.find(_TRAILER_START)
    return found + 1 if found >= 0 else len(block)


def _check_trailer(path: Path, line: bytes, digest: str, count: int, header: SnapshotHeader) -> None:
    try:
        trailer = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise SnapshotCorrupt(path, "bad trailer") from None
    if trailer.get("sha256") != digest:
        raise SnapshotCorrupt(path, "checksum mismatch")
    if trailer.get("keys") != count or header.keys != count:
        raise SnapshotCorrupt(path, f"{count} entries, the header says {header.keys}")


def sync_records_through(directory: Path, seq: int) -> None:
    """Make the records up to ``seq`` durable, before a snapshot that covers them is.

    Under ``fsync = everysec`` or ``no`` the last of them may still be only in
    the page cache: were the snapshot on disk first, a crash would leave it
    ahead of the segments (start-up copes, but their lines would be lost to
    the history). Only the segment holding ``seq`` can have any not yet on
    disk: a segment is synced when the journal rolls past it.
    """
    from kvd.log.reader import list_segments, segment_first_seq  # reader -> seal -> snapshot

    holding = [path for path in list_segments(directory) if segment_first_seq(path) <= seq]
    if not holding:
        return
    fd = os.open(holding[-1], os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a new, renamed or removed directory entry durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
