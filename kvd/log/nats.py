"""The journal on NATS JetStream: several kvd nodes, one stream, one total order.

Each node applies the stream in order. It keeps a copy of what it applied
in its data directory, written by the ``FileJournal`` this class extends,
so history, the change feed, ``?at=``, snapshots and start-up work as on a
single node; the copy is a cache (written without fsync), the stream is the
record. A record that cannot be written to the copy (disk full) stops the
node, writes and consistent reads, until a restart resumes from the stream
where the copy ends: applying later records would leave a gap in it.

Writes are optimistic: a node builds its records on everything it has
received, and publishes them, one message per batch, with
``Nats-Expected-Last-Sequence`` set to the last message it knows. If another
node's message took that place, JetStream refuses the batch; the other
message arrives through the subscription, and the node's own queued writes
are ``Superseded``: each is decided again (preconditions, merges) on the
newer state and sent again. So If-Match decided on two nodes at once has
exactly one winner. A write is answered only once its record came back
through the subscription and was applied here (read-your-writes).

A publish NATS does not confirm is sent again, unchanged (``Nats-Msg-Id``
lets JetStream store it once), until ``publish_timeout``; then its writers
get 503 (the outcome is unknown: the record may still be stored, and is then
applied like any other).

A stream can lose acknowledged messages (an R1 server's power cut before
its fsync, a store restored from a backup) and take others at their
stream seqs, where ``Nats-Expected-Last-Sequence`` would accept a record
chained to one that is gone. So after a disconnect, or a message delivered
again, a node publishes nothing until it has seen the stream still hold
its last received record; if it does not, the node refuses for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.js.errors import APIError

from kvd.config import NatsConfig
from kvd.errors import PayloadTooLarge
from kvd.log import nats_stream
from kvd.log.file import FileJournal, _Pending, build_record
from kvd.log.format import GENESIS_HASH, Record, RecordError, decode_record, format_ts
from kvd.log.journal import JournalStats, JournalUnavailable, StartupRefused, Superseded
from kvd.log.nats_durability import durability_warnings
from kvd.log.reader import list_segments
from kvd.log.snapshot import list_snapshots, snapshot_name
from kvd.model import Change

log = logging.getLogger("kvd.journal")

STALLED_SECONDS = 1.0  # an unconfirmed publish older than this makes /readyz answer 503
# A hung server or a partition keeps the TCP connection open: a PING every second, and
# the link counts as dead when the third finds two unanswered (about 3 s). nats-py's
# defaults (2 minutes, 2) left a node ready for minutes on a link that carried nothing.
PING_SECONDS = 1
MAX_OUTSTANDING_PINGS = 2
# A stream found shorter than what this node applied must stay so for this long before
# the node refuses: a cluster member restarted a moment ago answers with its stale state
# for about a second (tests/natsserver.py).
SHORT_STREAM_SECONDS = 3.0
HEADER_ROOM = 1024  # bytes of max_payload left for headers
KEEP_SNAPSHOTS = 2  # in the bucket, with archive off; the stream keeps the records after the older one


PEER_SILENT_NS = 3_000_000_000  # a replica not heard from for this long counts as gone


def stream_has_quorum(info, heard_within_ns: int = PEER_SILENT_NS) -> bool:  # noqa: ANN001 - nats.js.api.StreamInfo
    """Whether the stream can confirm a write: a leader that hears from a majority.

    A leader that just lost its peers still answers ``stream_info`` for a few
    seconds, so an answer alone does not mean writes would be confirmed; a
    replica counts only if the leader heard from it within ``heard_within_ns``.
    """
    cluster = info.cluster
    if cluster is None or not cluster.replicas:
        return cluster is None or bool(cluster.leader)
    if not cluster.leader:
        return False
    heard = sum(
        1 for peer in cluster.replicas
        if peer.current and not peer.offline and (peer.active or 0) < heard_within_ns
    )
    return heard + 1 > (len(cluster.replicas) + 1) // 2


class StreamMismatch(StartupRefused):
    """The local copy and the stream disagree: start-up stops so nothing is mixed."""


@dataclass
class Counts:
    """What /metrics shows about this node's traffic with the stream."""

    messages: int = 0
    records: int = 0
    received: int = 0
    superseded: int = 0
    unconfirmed: int = 0


@dataclass(slots=True)
class _Outgoing:
    """One publish: own records in order, as one message."""

    items: list[_Pending]
    payload: bytes
    expected: int  # Nats-Expected-Last-Sequence
    deadline: float
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def first_hash(self) -> str:
        return self.items[0].record.hash


class NatsJournal(FileJournal):
    cancellable_open = True  # it may wait for NATS for ever
    answers_in_place = False  # a write another node supersedes is decided again (Store.write)

    def __init__(
        self,
        directory: Path,
        *,
        settings: NatsConfig,
        fsync_policy: str = "always",
        on_note: Callable[[Record], None] = lambda record: None,
        on_reset: Callable[[], None] = lambda: None,
        **local_copy: Any,
    ) -> None:
        """``local_copy``: FileJournal's settings and callbacks, for the copy in ``directory``.

        The local copy needs no fsync: after a crash it is cut back to its
        last whole record and the rest comes from the stream again.
        """
        super().__init__(directory, fsync="no", **local_copy)
        self.settings = settings
        self.fsync_policy = fsync_policy  # what the operator asked for; compared with the stream's
        self.on_note = on_note
        self.on_reset = on_reset
        self.subject = nats_stream.subject(settings.stream)
        self._nc: nats.NATS | None = None
        self._js = None
        self._objects = None
        self._subscription = None
        self._connected = False
        self._caught_up = False
        # What this node received from the stream (chain checked), and applied.
        self._received_stream_seq = 0
        self._received_seq = 0
        self._received_hash = GENESIS_HASH
        self._applied_stream_seq = 0
        self._message_ends: dict[int, int] = {}  # last record seq of a received message -> its stream seq
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_ids = 0
        # Own writes: built on everything received plus own queued records.
        self._tail_seq = 0
        self._tail_hash = GENESIS_HASH
        self._expected = 0  # the last stream seq this node knows of
        self._outbox: list[_Pending] = []
        self._inflight: _Outgoing | None = None
        self._acked: dict[str, _Outgoing] = {}  # first record hash -> acknowledged, not yet received
        self._tasks: set[asyncio.Task[None]] = set()
        self._unconfirmed_since: float | None = None  # when the oldest unconfirmed publish went out
        self._probe: asyncio.Task[None] | None = None
        self._probe_first_answer: float | None = None  # the window starts again on each reconnect
        # False from a disconnect (or a redelivered message) until the stream is seen to
        # still hold the last record received: writes queue but nothing is published
        # meanwhile, since Nats-Expected-Last-Sequence compares stream seqs, not what
        # is at them. The check takes a round trip or two.
        self._stream_checked = True
        self._check: asyncio.Task[None] | None = None
        self._closing = False
        self._cut_stream_seqs: dict[int, int] = {}  # snapshot seq -> stream seq of its last message
        self.published = Counts()

    # --- start-up ------------------------------------------------------------

    async def open(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Connect, load the local copy (or the newest snapshot), then apply the stream to its end."""
        await self._connect()
        assert self._js is not None
        info = await nats_stream.ensure_stream(self._js, self.settings.stream, self.settings.replicas)
        for warning in durability_warnings(
            str(self._nc.connected_server_version), info.config.num_replicas or 1, self.fsync_policy, None
        ):
            log.warning("%s", warning)
        self._objects = await nats_stream.ensure_bucket(self._js, self.settings.stream, self.settings.replicas)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, FileJournal.replay, self, progress)
        start = await self._locate_start(progress)
        target = (await nats_stream.position(self._js, self.settings.stream)).last
        await self._subscribe(start)
        await self._wait_applied(target)
        # From here writers decide on the received state: what is still on its
        # way to the local copy joins their view.
        for item in self._writing + self._queue:
            self.on_note(item.record)
        self._tail_seq, self._tail_hash = self._received_seq, self._received_hash
        self._expected = max(self._expected, self._received_stream_seq)
        self._caught_up = True
        if not self._stream_checked:  # NATS went away and came back during start-up
            self._start_check()
        log.info(
            "NATS stream %s: applied through stream seq %d (record %d)",
            self.settings.stream, self._applied_stream_seq, self._received_seq,
        )

    async def _connect(self) -> None:
        async def disconnected() -> None:
            self._connected = False
            self._stream_checked = False
            if not self._closing:
                log.warning("NATS disconnected: writes answer 503 until it is back")

        async def reconnected() -> None:
            self._connected = True
            log.info("NATS reconnected to %s", self._nc.connected_url.netloc if self._nc else "?")
            self._doubt_the_stream()
            self._start_check()

        async def error(exc: Exception) -> None:
            log.warning("NATS: %s", exc)

        while True:
            try:
                self._nc = await nats.connect(
                    servers=self.settings.servers, name=f"kvd-{os.getpid()}",
                    max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2,
                    # No buffer while reconnecting: nats-py would send a buffered publish
                    # on reconnect, before the stream is checked (_check_stream).
                    pending_size=0,
                    ping_interval=PING_SECONDS, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
                )
                break
            except (NatsError, OSError) as exc:
                log.warning("cannot reach NATS at %s (%s); trying again", ", ".join(self.settings.servers), exc)
                await asyncio.sleep(1.0)
        self._connected = True
        self._js = self._nc.jetstream(timeout=self.settings.publish_timeout)
        log.info("connected to NATS %s (server %s)", self._nc.connected_url.netloc, self._nc.connected_server_version)

    async def _locate_start(self, progress: Callable[[int, int], None] | None) -> int:
        """The stream seq to subscribe from; replaces a stale local copy with the newest snapshot."""
        assert self._js is not None and self._objects is not None
        stream = self.settings.stream
        where = await nats_stream.position(self._js, stream)
        local = self._durable_seq
        self._received_seq, self._received_hash = local, self._durable_hash
        if where.last == 0:
            if local > 0:
                raise StreamMismatch(
                    f"{self.directory} holds records up to seq {local} but stream {stream} is empty: "
                    "another stream's copy, or the stream was deleted; move the directory away to "
                    "start from the stream"
                )
            return 1
        snapshots = await nats_stream.list_snapshots(self._objects)
        newest = snapshots[-1] if snapshots else None
        found = await nats_stream.find_message(self._js, stream, local + 1, where)
        if found is not None and not (local == 0 and newest is not None):
            return found
        last_first, last_last = await nats_stream.record_range(self._js, stream, where.last) if where.messages else (0, 0)
        if found is None and local > 0 and local == last_last:
            last_line = nats_stream.last_line((await self._js.get_msg(stream, where.last)).data)
            if decode_record(last_line).hash != self._durable_hash:
                raise StreamMismatch(
                    f"record {local} in {self.directory} differs from the stream's: "
                    "another stream's copy; move the directory away to start from the stream"
                )
            self._received_stream_seq = self._applied_stream_seq = where.last
            return where.last + 1
        if local > last_last and where.messages:
            raise StreamMismatch(
                f"{self.directory} holds records up to seq {local}, past the stream's last ({last_last}): "
                "another stream's copy, or NATS lost messages this node applied; move the directory "
                "away (keep it, if it holds lost records) to start from the stream"
            )
        if newest is None or newest.seq < local or newest.stream_seq + 1 < where.first:
            raise StreamMismatch(
                f"record {local + 1} is no longer in stream {stream} and no snapshot continues "
                f"from there (newest: {newest.name if newest else 'none'})"
            )
        log.info("loading snapshot %s (seq %d) from NATS", newest.name, newest.seq)
        await asyncio.get_running_loop().run_in_executor(None, self._clear_local_copy)
        self.on_reset()
        await nats_stream.download_snapshot(self._objects, newest, self.directory)
        await asyncio.get_running_loop().run_in_executor(None, FileJournal.replay, self, progress)
        self._received_seq, self._received_hash = self._durable_seq, self._durable_hash
        self._received_stream_seq = self._applied_stream_seq = newest.stream_seq
        return newest.stream_seq + 1

    def _clear_local_copy(self) -> None:
        """Drop the local copy's live files (the stream has them); archive/ stays."""
        self._close_files()
        for path in list_segments(self.directory) + list_snapshots(self.directory):
            path.unlink()
        self.stats = JournalStats()
        self._durable_seq, self._durable_hash, self._durable_ts = 0, GENESIS_HASH, ""
        self._next_seq, self._head_hash, self._snapshot_seq = 1, GENESIS_HASH, 0

    async def _subscribe(self, start: int) -> None:
        from nats.js import api

        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
            ack_policy=api.AckPolicy.NONE,
        )
        assert self._js is not None
        self._subscription = await self._js.subscribe(
            self.subject, cb=self._on_message, ordered_consumer=True, config=config, idle_heartbeat=1.0,
        )

    # --- receiving -------------------------------------------------------------

    async def _on_message(self, message) -> None:  # noqa: ANN001 - nats.aio.msg.Msg
        try:
            self._receive(message.metadata.sequence.stream, message.data)
        except Exception as exc:  # noqa: BLE001 - a bad message must stop writes, not the subscription
            if self._refusal is None:
                self._refuse(f"cannot apply the stream: {exc}; restart this node", StreamMismatch(str(exc)))

    def _refuse(self, reason: str, at_start_up: StartupRefused | None = None) -> None:
        """Refuse writes and consistent reads until restart; ``/readyz`` answers 503 with ``reason``.

        Nothing received after this is applied or written, so the local copy
        ends at its last whole record and a restart goes on from the stream.
        A start-up still waiting for the stream stops with ``at_start_up``.
        """
        if self._refusal is None:
            self._refusal = reason
            log.critical("%s", reason)
        error = JournalUnavailable(self._refusal)
        self._fail_all_own(error)
        waiters, self._waiters = self._waiters, []
        for _, _, future in waiters:
            if not future.done():
                future.set_exception(error if self._caught_up else at_start_up or StartupRefused(self._refusal))

    def _fail_pending(self, batch: list[_Pending], exc: BaseException) -> None:
        """A record could not be written to the local copy: the stream holds it, so this
        node can never apply it (nor anything after it) and stops until restart, which
        goes on from the stream where the copy ends. (The file backend's writer may try
        again: there a failed record was never committed.)"""
        errno_ = getattr(exc, "errno", None) or errno.EIO
        self._refuse(
            f"the local copy in {self.directory} could not be written at record {batch[0].record.seq} "
            f"({os.strerror(errno_)}), which the NATS stream holds: this node stops applying the stream; "
            "restart it once the disk is writable and it catches up from the stream"
        )
        super()._fail_pending(batch, exc)

    def _receive(self, stream_seq: int, data: bytes) -> None:
        """Check one message against the chain and hand its records to the local copy."""
        if self._refusal is not None:
            return
        if stream_seq <= self._received_stream_seq:
            # Delivered again (after a reconnect), or the stream lost messages and
            # took new ones at their seqs: publish nothing until it is checked.
            self._stream_checked = False
            self._start_check()
            return
        records = []
        seq, prev = self._received_seq, self._received_hash
        for line in nats_stream.lines(data):
            try:
                record = decode_record(line)
            except RecordError as exc:
                raise StreamMismatch(f"stream seq {stream_seq}: {exc}") from None
            if record.seq <= self._received_seq:
                continue  # already in the local copy (the first message after start-up)
            if record.seq != seq + 1 or record.prev != prev:
                raise StreamMismatch(
                    f"stream seq {stream_seq}: record {record.seq} does not continue the chain at "
                    f"seq {seq} (this node fell behind a compaction, or the stream was altered)"
                )
            seq, prev = record.seq, record.hash
            records.append(record)
        self._received_stream_seq = stream_seq
        self._expected = max(self._expected, stream_seq)
        if not records:
            if not self._queue and not self._writing:
                self._mark_applied(stream_seq)
            return
        self._received_seq, self._received_hash = seq, prev
        ours = self._acked.pop(records[0].hash, None)
        if ours is None and self._inflight is not None and self._inflight.first_hash == records[0].hash:
            ours, self._inflight = self._inflight, None
            self._schedule_publish()
        if ours is not None:
            self._unconfirmed_since = None
            self.published.messages += 1
            self.published.records += len(ours.items)
            ours.settled.set()
            for item in ours.items:
                self._enqueue(item.record, item.future)
        else:
            if self._inflight is not None or self._outbox:
                self._supersede()
            for record in records:
                if self._caught_up:
                    self.on_note(record)
                self._enqueue(record, None)
        self._message_ends[seq] = stream_seq
        if self._inflight is None and not self._outbox and not self._acked:
            self._tail_seq, self._tail_hash = seq, prev
        self.published.received += len(records)

    def _supersede(self) -> None:
        """Another node's message came first: own unsent and unconfirmed writes are decided again."""
        doomed = (self._inflight.items if self._inflight is not None else []) + self._outbox
        if self._inflight is not None:
            self._inflight.settled.set()
        self._inflight, self._outbox = None, []
        self._forget_own_pending()
        self.published.superseded += len(doomed)
        for item in doomed:
            if item.future is not None and not item.future.done():
                item.future.set_exception(Superseded())

    def _forget_own_pending(self) -> None:
        """Writers' view = what was received (applied or not), nothing more."""
        self.on_abort()
        for item in self._writing + self._queue:
            self.on_note(item.record)
        self._tail_seq, self._tail_hash = self._received_seq, self._received_hash
        for batch in self._acked.values():  # confirmed, on their way: still part of the state
            for item in batch.items:
                self.on_note(item.record)
                self._tail_seq, self._tail_hash = item.record.seq, item.record.hash

    def _batch_committed(self, batch: list[_Pending]) -> None:
        for item in batch:
            stream_seq = self._message_ends.pop(item.record.seq, None)
            if stream_seq is not None:
                self._mark_applied(stream_seq)

    def _mark_applied(self, stream_seq: int) -> None:
        self._applied_stream_seq = max(self._applied_stream_seq, stream_seq)
        while self._waiters and self._waiters[0][0] <= self._applied_stream_seq:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    async def _wait_applied(self, stream_seq: int) -> None:
        if stream_seq <= self._applied_stream_seq:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter_ids += 1
        heapq.heappush(self._waiters, (stream_seq, self._waiter_ids, future))
        await future

    async def catch_up(self) -> None:
        """``?consistent=1``: apply everything the stream holds now before reading."""
        if self._refusal is not None:
            raise JournalUnavailable(f"a consistent read cannot be served: {self._refusal}")
        if not self._connected or self._js is None:
            raise JournalUnavailable("NATS is unavailable: a consistent read cannot be served")
        have = self._received_stream_seq  # before asking: messages arrive meanwhile
        try:
            last = (await nats_stream.position(self._js, self.settings.stream)).last
            if last < have:  # the stream lost messages, or a stale answer
                self._stream_checked = False
                self._start_check()
                raise JournalUnavailable(
                    f"the NATS stream ends at seq {last}, before seq {have} "
                    "applied here: a consistent read cannot be served"
                )
            await asyncio.wait_for(self._wait_applied(last), self.settings.publish_timeout)
        except (NatsError, TimeoutError) as exc:
            raise JournalUnavailable(f"NATS did not answer in time: {exc or 'timeout'}") from None

    def extra_metrics(self) -> dict[str, tuple[str, str, float]]:
        counts = self.published
        return {
            "kvd_nats_published_messages": ("counter", "Messages this node published to the stream", counts.messages),
            "kvd_nats_published_records": ("counter", "Records in them (records per message: the batching)", counts.records),
            "kvd_nats_received_records": ("counter", "Records received from the stream, from every node", counts.received),
            "kvd_nats_superseded_writes": (
                "counter", "Writes decided again because another node's record came first", counts.superseded,
            ),
            "kvd_nats_unconfirmed_writes": (
                "counter", "Writes answered 503 because NATS did not confirm them in time", counts.unconfirmed,
            ),
            "kvd_nats_applied_stream_seq": ("gauge", "Stream sequence applied here", self._applied_stream_seq),
            "kvd_nats_connected": ("gauge", "1 while connected to NATS", int(self._connected)),
        }

    # --- appending ---------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self._refusal is None and not self._closed and self._connected and self._caught_up

    @property
    def retry_can_succeed(self) -> bool:
        return self._refusal is None and not self._closed

    @property
    def readiness_problem(self) -> str | None:
        """Also not ready while NATS takes no writes (e.g. a stream without a leader)."""
        problem = self.refusal
        if problem is None and self._unconfirmed_since is not None:
            if asyncio.get_running_loop().time() - self._unconfirmed_since > STALLED_SECONDS:
                problem = "NATS is not confirming writes (is the stream without a leader?)"
        return problem

    @property
    def refusal(self) -> str | None:
        if self._refusal is not None:
            return self._refusal
        if not self._connected and not self._caught_up:
            return f"cannot reach NATS at {', '.join(self.settings.servers)}; start-up waits for it"
        if not self._connected:
            return "NATS is unavailable; reads are served from the last applied state"
        if not self._caught_up:
            return "catching up with the NATS stream"
        return None

    def append(self, change: Change) -> asyncio.Future[Record]:
        if not self.writable:
            raise JournalUnavailable(self.refusal or "journal is closed")
        record = build_record(change, self._tail_seq + 1, self._tail_hash, format_ts(self.clock()))
        room = self._nc.max_payload - HEADER_ROOM if self._nc is not None else 1 << 20
        if len(record.line) > room:
            raise PayloadTooLarge(
                f"the record is {len(record.line)} bytes; the NATS server takes messages up to "
                f"{room} (raise max_payload in its configuration)"
            )
        self._tail_seq, self._tail_hash = record.seq, record.hash
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._outbox.append(_Pending(record.line, record, future))
        self._schedule_publish()
        return future

    def _schedule_publish(self) -> None:
        if self._inflight is None and self._outbox:
            # Next loop pass: every write of this pass joins the same message.
            asyncio.get_running_loop().call_soon(self._publish_next)

    def _publish_next(self) -> None:
        if self._inflight is not None or not self._outbox:
            return
        room = (self._nc.max_payload if self._nc is not None else 1 << 20) - HEADER_ROOM
        count, size = 0, 0
        for item in self._outbox:
            if count and size + len(item.line) > room:
                break
            count += 1
            size += len(item.line)
        items, self._outbox = self._outbox[:count], self._outbox[count:]
        deadline = asyncio.get_running_loop().time() + self.settings.publish_timeout
        batch = _Outgoing(items, b"".join(item.line for item in items), self._expected, deadline)
        self._inflight = batch
        if self._unconfirmed_since is None:
            self._unconfirmed_since = asyncio.get_running_loop().time()
        task = asyncio.get_running_loop().create_task(self._publish(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, batch: _Outgoing) -> None:
        assert self._js is not None
        loop = asyncio.get_running_loop()
        headers = {
            "Nats-Expected-Last-Sequence": str(batch.expected),
            "Nats-Msg-Id": batch.first_hash,
            nats_stream.FIRST_SEQ_HEADER: str(batch.items[0].record.seq),
            nats_stream.LAST_SEQ_HEADER: str(batch.items[-1].record.seq),
        }
        pause = 0.05
        while batch is self._inflight:
            remaining = batch.deadline - loop.time()
            if remaining <= 0:
                self._abandon(batch)
                return
            if not self._stream_checked:  # the expected seq may no longer hold our chain
                await asyncio.sleep(min(pause, remaining))
                continue
            try:
                ack = await self._js.publish(
                    self.subject, batch.payload, timeout=min(remaining, 1.0), headers=headers
                )
            except APIError as exc:
                if exc.err_code == nats_stream.WRONG_LAST_SEQUENCE:
                    self._unconfirmed_since = None  # the stream answered: it works
                    # Another node's message took the place; it arrives through
                    # the subscription and supersedes this batch.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(batch.settled.wait(), max(0.0, batch.deadline - loop.time()))
                    if batch is self._inflight:
                        self._abandon(batch)
                    return
                log.warning("NATS refused a publish: %s", exc)
            except (NatsError, TimeoutError, OSError) as exc:
                log.debug("publish not confirmed (%r); sending it again", exc)
            else:
                self._unconfirmed_since = None
                if batch is self._inflight:
                    self._inflight = None
                    self._acked[batch.first_hash] = batch
                    self._expected = max(self._expected, ack.seq)
                    self._publish_next()
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _abandon(self, batch: _Outgoing) -> None:
        """NATS never confirmed ``batch``: its writers and everything queued after it get 503."""
        log.error(
            "NATS did not confirm records %d..%d within %.1fs; answering 503 (they may still be stored)",
            batch.items[0].record.seq, batch.items[-1].record.seq, self.settings.publish_timeout,
        )
        self._inflight = None
        failed = batch.items + self._outbox
        self._outbox = []
        self.published.unconfirmed += len(failed)
        self._forget_own_pending()
        error = JournalUnavailable(
            f"NATS did not confirm the write within {self.settings.publish_timeout:g}s; "
            "it may or may not have been stored"
        )
        for item in failed:
            if item.future is not None and not item.future.done():
                item.future.set_exception(error)
        self._start_probe()

    def _doubt_the_stream(self) -> None:
        """Reconnected, perhaps to a server whose stream lost its quorum with the one
        that went away: not ready until the stream shows one (the probe asks every
        second), rather than ready until a write fails."""
        if self._unconfirmed_since is None:
            self._unconfirmed_since = asyncio.get_running_loop().time() - 2 * STALLED_SECONDS
        self._probe_first_answer = None
        self._start_probe()

    def _start_probe(self) -> None:
        if self._js is not None and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_confirming())

    async def _probe_until_confirming(self) -> None:
        """After an unconfirmed write or a reconnect: ask the stream every second until
        it shows a quorum, so /readyz recovers without writes.

        Replicas count only if the leader heard from them after the probe's first
        answer since the last reconnect: a peer killed just before this node reconnected was heard from a
        moment ago, and would otherwise make a leader without a quorum look whole.
        """
        assert self._js is not None
        loop = asyncio.get_running_loop()
        self._probe_first_answer = None
        while self._unconfirmed_since is not None and not self._closed:
            await asyncio.sleep(1.0)
            asked = loop.time()
            try:
                info = await self._js.stream_info(self.settings.stream)
            except (NatsError, TimeoutError, OSError):
                continue
            if self._probe_first_answer is None:
                self._probe_first_answer = loop.time()
            heard_within_ns = min(PEER_SILENT_NS, int((asked - self._probe_first_answer) * 1e9))
            if self._inflight is None and stream_has_quorum(info, heard_within_ns):
                self._unconfirmed_since = None

    def _start_check(self) -> None:
        if self._js is not None and self._caught_up and (self._check is None or self._check.done()):
            self._check = asyncio.get_running_loop().create_task(self._check_stream())

    async def _check_stream(self) -> None:
        """Until the stream is seen to hold this node's last received record (then writes
        go on) or not to (then the node refuses for good: it applied records the
        stream no longer has, and publishing would chain onto a record that is gone)."""
        loop = asyncio.get_running_loop()
        short_since: float | None = None
        while not self._stream_checked and self._refusal is None and not self._closed:
            if not self._connected:
                return  # the reconnect starts the check again
            try:
                problem, short = await self._stream_lost()
            except (NatsError, TimeoutError, OSError, KeyError, ValueError, RecordError) as exc:
                log.debug("checking the stream: %r; trying again", exc)
                await asyncio.sleep(0.5)
                continue
            if problem is None:
                self._stream_checked = True
                return
            if short:  # perhaps a stale answer: it must last
                short_since = loop.time() if short_since is None else short_since
                if loop.time() - short_since < SHORT_STREAM_SECONDS:
                    await asyncio.sleep(0.5)
                    continue
            self._refuse(
                f"{problem}: NATS lost messages this node applied (a server restored from an older "
                "store, or one that lost power before its fsync); this node refuses writes so it "
                "never chains a record onto one the stream no longer has. Its data directory holds "
                "the lost records: keep it, and start the node with an empty one to follow the stream"
            )
            return

    async def _stream_lost(self) -> tuple[str | None, bool]:
        """(what the stream lost, or None; whether it is only shorter than expected)."""
        assert self._js is not None
        stream = self.settings.stream
        # Taken before asking: records received meanwhile may be newer than the answer.
        have, seq, digest = self._received_stream_seq, self._received_seq, self._received_hash
        where = await nats_stream.position(self._js, stream)
        if where.last < have:
            return f"stream {stream} ends at seq {where.last}, before seq {have} applied here", True
        if seq == 0 or where.messages == 0:
            return None, False
        last_seq = (await nats_stream.record_range(self._js, stream, where.last))[1]
        if last_seq < seq:
            return f"stream {stream} ends at record {last_seq}, before record {seq} applied here", True
        found = await nats_stream.find_message(self._js, stream, seq, where)
        if found is None:
            return None, False  # trimmed by a compaction: the chain check on the next record decides
        for line in nats_stream.lines((await self._js.get_msg(stream, found)).data):
            record = decode_record(line)
            if record.seq == seq:
                if record.hash != digest:
                    return f"record {seq} in stream {stream} differs from the one applied here", False
                return None, False
        return f"stream {stream} seq {found} does not hold record {seq} as its headers say", False

    def _fail_all_own(self, error: Exception) -> None:
        failed = (self._inflight.items if self._inflight is not None else []) + self._outbox
        failed += [item for batch in self._acked.values() for item in batch.items]
        self._inflight, self._outbox, self._acked = None, [], {}
        for item in failed:
            if item.future is not None and not item.future.done():
                item.future.set_exception(error)

    # --- compaction: snapshots to the bucket, then trim the stream ------------

    def _cut_now(self) -> None:
        self._cut_stream_seqs[self._durable_seq] = self._applied_stream_seq
        super()._cut_now()

    async def retire(self, through_seq: int) -> tuple[int, int]:
        result = await super().retire(through_seq)
        stream_seq = self._cut_stream_seqs.pop(through_seq, 0)
        for seq in [seq for seq in self._cut_stream_seqs if seq < through_seq]:
            del self._cut_stream_seqs[seq]
        if stream_seq:
            try:
                await self._share_snapshot(through_seq, stream_seq)
            except (NatsError, TimeoutError, OSError) as exc:
                log.warning("could not store snapshot %d in NATS: %s (the next compaction tries again)", through_seq, exc)
        return result

    async def _share_snapshot(self, seq: int, stream_seq: int) -> None:
        """Store the snapshot for nodes that start later, then trim the stream behind the older one."""
        assert self._js is not None and self._objects is not None
        existing = await nats_stream.list_snapshots(self._objects)
        if not existing or existing[-1].seq < seq:
            await nats_stream.upload_snapshot(self._objects, self.directory / snapshot_name(seq), stream_seq)
            existing = await nats_stream.list_snapshots(self._objects)
            log.info("snapshot %d stored in bucket %s", seq, nats_stream.bucket(self.settings.stream))
        if self.archive or len(existing) < KEEP_SNAPSHOTS:
            return
        # Records after the second-newest snapshot stay, so a node a little
        # behind catches up from the stream instead of reloading a snapshot.
        keep_from = existing[-KEEP_SNAPSHOTS]
        await self._js.purge_stream(self.settings.stream, seq=keep_from.stream_seq + 1)
        for old in existing[:-KEEP_SNAPSHOTS]:
            await self._objects.delete(old.name)

    # --- shutdown --------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closing = True
        for task in (self._probe, self._check):
            if task is not None:
                task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, self.settings.publish_timeout)
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._connected = False
        await super().close()
