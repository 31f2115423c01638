"""How kvd's journal lives in NATS JetStream: names, message layout, and the reads both servers and auditors need.

Layout (docs/nats.md):
- one stream (``journal.nats.stream``, default ``KVD``) on subject
  ``kvd.<stream>.journal``; each message holds one or more complete journal
  lines, exactly as a segment file holds them, with consecutive ``seq``.
  Headers ``Kvd-First-Seq`` and ``Kvd-Last-Seq`` name the records it holds,
  so a record is found by a binary search over stream sequences;
- snapshots, in the file snapshot format, in the object store bucket
  ``<stream>-snapshots`` under their file name (``snapshot-<seq>.jsonl``),
  with the stream sequence of the message holding record ``seq`` in the
  object's description (``stream_seq=N``).

Records are appended with ``Nats-Expected-Last-Sequence`` (so the stream
holds one chain, whatever the number of writers) and ``Nats-Msg-Id`` set to
the first record's hash (so a resent message is stored once).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from kvd.log.snapshot import TEMP_SUFFIX, fsync_directory, is_snapshot_name, snapshot_seq

FIRST_SEQ_HEADER = "Kvd-First-Seq"
LAST_SEQ_HEADER = "Kvd-Last-Seq"
WRONG_LAST_SEQUENCE = 10071  # JetStream's err_code for a failed Nats-Expected-Last-Sequence
DUPLICATE_WINDOW_SECONDS = 120.0


def subject(stream: str) -> str:
    return f"kvd.{stream}.journal"


def bucket(stream: str) -> str:
    return f"{stream}-snapshots"


@dataclass(frozen=True)
class StreamPosition:
    """The stream's first and last message sequences (``last`` 0: never written)."""

    first: int
    last: int
    messages: int


@dataclass(frozen=True)
class SnapshotObject:
    name: str
    seq: int  # the last record the snapshot holds
    stream_seq: int  # the message holding that record


async def ensure_stream(js: JetStreamContext, stream: str, replicas: int) -> api.StreamInfo:
    """The journal stream, created on first use (file storage, ``replicas`` copies)."""
    try:
        return await js.stream_info(stream)
    except NotFoundError:
        pass
    config = api.StreamConfig(
        name=stream,
        subjects=[subject(stream)],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.NEW,  # never drop a record to make room: refuse the write
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        max_msgs_per_subject=-1,
    )
    return await js.add_stream(config)


async def ensure_bucket(js: JetStreamContext, stream: str, replicas: int) -> ObjectStore:
    try:
        return await js.object_store(bucket(stream))
    except NotFoundError:  # BucketNotFoundError
        pass
    return await js.create_object_store(
        bucket(stream), config=api.ObjectStoreConfig(storage=api.StorageType.FILE, replicas=replicas)
    )


async def position(js: JetStreamContext, stream: str) -> StreamPosition:
    state = (await js.stream_info(stream)).state
    return StreamPosition(state.first_seq, state.last_seq, state.messages)


async def record_range(js: JetStreamContext, stream: str, stream_seq: int) -> tuple[int, int]:
    """The first and last record seq held by message ``stream_seq``."""
    message = await js.get_msg(stream, stream_seq)
    headers = message.headers or {}
    return int(headers[FIRST_SEQ_HEADER]), int(headers[LAST_SEQ_HEADER])


async def find_message(js: JetStreamContext, stream: str, record_seq: int, where: StreamPosition) -> int | None:
    """The stream sequence of the message holding ``record_seq``; None when not retained.

    Binary search: messages hold increasing, consecutive record seqs, and
    only the front of the stream is ever purged, so the retained stream
    sequences are contiguous.
    """
    low, high = where.first, where.last
    if where.messages == 0 or low > high:
        return None
    while low <= high:
        middle = (low + high) // 2
        first, last = await record_range(js, stream, middle)
        if record_seq < first:
            high = middle - 1
        elif record_seq > last:
            low = middle + 1
        else:
            return middle
    return None


async def messages(
    js: JetStreamContext, stream: str, start: int, until: int, *, timeout: float = 10.0
) -> AsyncIterator[tuple[int, bytes]]:
    """(stream seq, payload) of messages ``start..until`` in order, for reading history."""
    if until < start:
        return
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
        ack_policy=api.AckPolicy.NONE,
    )
    subscription = await js.subscribe(subject(stream), ordered_consumer=True, config=config)
    try:
        while True:
            message = await subscription.next_msg(timeout=timeout)
            stream_seq = message.metadata.sequence.stream
            yield stream_seq, message.data
            if stream_seq >= until:
                return
    finally:
        await subscription.unsubscribe()


async def list_snapshots(store: ObjectStore) -> list[SnapshotObject]:
    """Snapshots in the bucket, oldest first."""
    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:  # an empty bucket
        return []
    found = []
    for info in infos:
        if info.deleted or not is_snapshot_name(info.name):
            continue
        found.append(SnapshotObject(info.name, snapshot_seq(Path(info.name)), _stream_seq_of(info.description)))
    return sorted(found, key=lambda item: item.seq)


async def download_snapshot(store: ObjectStore, snapshot: SnapshotObject, directory: Path) -> Path:
    """Fetch a snapshot into ``directory`` under its file name, atomically."""
    target = directory / snapshot.name
    temp = target.with_name(target.name + TEMP_SUFFIX)
    result = await store.get(snapshot.name)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _write_file, temp, target, result.data or b"")
    return target


async def upload_snapshot(store: ObjectStore, path: Path, stream_seq: int) -> None:
    data = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
    meta = api.ObjectMeta(name=path.name, description=f"stream_seq={stream_seq}")
    await store.put(path.name, data, meta=meta)


def lines(data: bytes) -> list[bytes]:
    """A message's journal lines, split at ``\n`` only and keeping it (a last piece without one stays)."""
    parts = data.split(b"\n")
    found = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        found.append(parts[-1])
    return found


def last_line(data: bytes) -> bytes:
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    return data[data.rfind(b"\n", 0, end) + 1 :]


def _stream_seq_of(description: str | None) -> int:
    if description and description.startswith("stream_seq="):
        return int(description.split("=", 1)[1])
    return 0


def _write_file(temp: Path, target: Path, data: bytes) -> None:
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, target)
    fsync_directory(target.parent)
