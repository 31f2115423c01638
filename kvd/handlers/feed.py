"""``GET /journal``: the change feed, as JSON Lines or Server-Sent Events.

``HEAD /journal`` answers with GET's status and headers (``?follow=1`` too)
and ends at once.

Each record is sent as the journal's own line (``Record.line``), byte for
byte, so a consumer can check its hash and the chain. ``?since=SEQ`` starts
after SEQ (``Last-Event-ID`` does the same and wins, so an EventSource
resumes where it stopped); ``?key=PATTERN`` keeps the records that change a
matching key (a clear changes every key).

Without ``follow`` the answer is the retained history up to the last record
committed when the request arrived, then it ends. With ``follow=1`` it stays
open and every record committed later is delivered too, exactly once and in
order:

1. subscribe to commits first (``Store.observers``, called on the loop in seq
   order as each record becomes durable) into a bounded buffer, and note the
   last durable seq L in the same loop turn, so no record falls between;
2. pin the journal at the feed's position (``Journal.pin``, moved along as
   records are sent, released when the stream ends), so a concurrent
   compaction keeps every segment still to be read, and send the history up
   to L from disk, in batches read in a worker thread;
3. then send the buffer (skipping what history already sent) and go on live.

Without ``follow`` steps 2 and 3 are all there is, up to the head at the time
of the request; without ``since`` that starts at the oldest retained record.

Limits:
- Memory: one history batch (``HISTORY_BATCH_RECORDS`` / ``_BYTES``) and the
  live buffer (``LIVE_BUFFER_RECORDS`` / ``_BYTES``) per follower; buffered
  records are the store's own objects, shared by every follower.
- When the buffer overflows, it is dropped and the feed reads on from disk
  (the pin keeps the records there): while catching up on history, or when
  a burst bigger than the buffer commits while the client keeps up. When it
  overflows while the caught-up client is still taking earlier bytes, the
  client cannot keep up with the writes: the stream ends with a last line
  ``{"error": {"code": "too_slow", ...}}`` (SSE: an ``event: error``) naming
  the seq to resume from. A client that takes no bytes for
  ``STALL_SECONDS`` is disconnected, so it cannot pin history (and so disk)
  for ever.
- On shutdown a follower ends with ``{"error": {"code": "unavailable", ...}}``;
  it is not counted in flight, so it does not hold up the drain.
- SSE streams get a ``: keepalive`` comment after ``HEARTBEAT_SECONDS``
  without a record, so proxies do not cut an idle stream. JSON Lines streams
  carry only records (and that last error line).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from tornado.iostream import StreamClosedError

from kvd.errors import BadRequest, Gone, NotFound, plugin_required
from kvd.handlers.base import ADMIN, STALL_SECONDS, BaseHandler, error_body, flushed_within
from kvd.log.format import Record
from kvd.log.history import History, HistoryGone

log = logging.getLogger("kvd.app")

NDJSON_TYPE = "application/x-ndjson"
SSE_TYPE = "text/event-stream"


def retained_history(ctx: Any) -> History:
    """The journal's history on disk (what the feed and ``?at=`` read); 404 when it keeps none."""
    history = getattr(ctx.journal, "history", None)
    if history is None:
        raise NotFound("this journal backend keeps no history kvd can read")
    return history()


def parse_seq(raw: str, name: str) -> int:
    """A sequence number given by a client: ASCII digits; 400 otherwise."""
    if not raw.isascii() or not raw.isdigit():
        raise BadRequest(f"{name} must be a sequence number (an integer >= 0), not {raw!r}")
    return int(raw)


def wants_sse(accept: str) -> bool:
    """Whether the Accept header lists ``text/event-stream``."""
    return any(
        part.split(";", 1)[0].strip().lower() == SSE_TYPE for part in accept.split(",")
    )


class HistoryCursor:
    """Retained records after a seq, read in batches; ``batch`` runs in a worker thread.

    One reader pass serves every batch (a segment is read once, not once a
    batch). When it reaches the end of what is on disk, or a record past
    what it was asked for, it lets the pass go and starts a new one after
    the last record it returned the next time more is asked for. (A record
    on disk past the durable head is never kept: its write may still fail
    and its seq go to another record.)
    """

    def __init__(self, history: History, after: int) -> None:
        self.history = history
        self.last = after
        self._records: Iterator[Record] | None = None

    def batch(self, upto: int, max_records: int, max_bytes: int) -> list[Record]:
        """Records after ``last`` up to seq ``upto``; raises HistoryGone if they were retired."""
        found: list[Record] = []
        size = 0
        fresh = False
        while len(found) < max_records and size < max_bytes and self.last < upto:
            if self._records is None:
                self._records, fresh = self.history.records(self.last), True
            record = next(self._records, None)
            if record is None or record.seq > upto:
                self.close()
                if record is None and not fresh:
                    continue  # the pass had reached the end of the files: look again once
                break
            found.append(record)
            size += record.size
            self.last = record.seq
        return found

    def close(self) -> None:
        if self._records is not None:
            self._records.close()  # type: ignore[attr-defined]
            self._records = None


class _StreamEnded(Exception):
    """The stream is over (client gone, stalled, or ended with a reason line)."""


class FeedHandler(BaseHandler):
    """``GET /journal``: records as they are in the journal; see the module docstring."""

    endpoint = "/journal"
    scopes = {"GET": ADMIN, "HEAD": ADMIN}

    HISTORY_BATCH_RECORDS = 1000
    """Records read from disk (and flushed to the client) at a time."""
    HISTORY_BATCH_BYTES = 1 << 20
    LIVE_BUFFER_RECORDS = 10_000
    """Committed records a follower may have waiting; beyond this it is too slow (module docstring)."""
    LIVE_BUFFER_BYTES = 32 << 20
    HEARTBEAT_SECONDS = 15.0
    """Idle time after which an SSE stream gets a ``: keepalive`` comment."""
    STALL_SECONDS = STALL_SECONDS

    def initialize(self, ctx: Any) -> None:
        super().initialize(ctx)
        self._sse = False
        self._match: Callable[[str], bool] | None = None
        self._sent = 0  # the feed's position: every record up to here was sent or filtered out
        self._pin: object | None = None
        self._cursor: HistoryCursor | None = None
        self._subscribed = False
        self._live: deque[Record] = deque()
        self._live_bytes = 0
        self._overflowed = False
        self._overflow_blocked = False  # it overflowed while a flush waited for the client
        self._flushing = False
        self._wake = asyncio.Event()
        self._end: tuple[str, str] | None = None  # (code, message) asked for from outside
        self._idle = False  # waiting for records: an end can be written at once
        self._gone = False  # the client hung up
        self._started = False

    # --- request -------------------------------------------------------------

    async def get(self) -> None:
        self.require_ready()
        since = self._since()
        follow = self._follow()
        self._match = self._key_match()
        history = retained_history(self.ctx)
        self._sse = wants_sse(self.request.headers.get("Accept", ""))
        journal = self.ctx.journal
        try:
            if follow and self.request.method != "HEAD":
                # In this order, in one loop turn: subscribe, note the head, pin.
                self._subscribe()
                head = journal.last_seq
                start = head if since is None else since
                self._pin = journal.pin(start)
                self._stop_counting_in_flight()
                self.ctx.streams.add(self._end_from_outside)
                await self._open(history, start, head)
                await self._follow_on(history, head)
            elif self.request.method == "HEAD":
                # GET's checks, its 410 (found by reading the first batch) and its headers,
                # then the end: a HEAD has no records to send, and none to wait for.
                head = journal.last_seq
                await self._open(history, head if follow and since is None else since, head)
            else:
                head = journal.last_seq
                await self._open(history, since, head)
                await self._catch_up(head)
        except _StreamEnded:
            pass
        except StreamClosedError:
            self._gone = True
        finally:
            self._release()
        if not self._finished:
            try:
                self.finish()
            except StreamClosedError:
                pass

    head = get  # GET's status and headers; see get for why a HEAD never streams

    def _since(self) -> int | None:
        """Where to start: ``Last-Event-ID`` (an EventSource resuming) over ``since``; both checked."""
        raw = self.query("since")
        since = None if raw is None else parse_seq(raw, "since")
        last_event = self.request.headers.get("Last-Event-ID")
        if last_event is not None:
            return parse_seq(last_event.strip(), "Last-Event-ID")
        return since

    def _follow(self) -> bool:
        raw = self.query("follow")
        if raw is None or raw in ("0", "false"):
            return False
        if raw in ("1", "true"):
            return True
        raise BadRequest(f"follow must be 1 (or true) or 0 (or false), not {raw!r}")

    def _key_match(self) -> Callable[[str], bool] | None:
        pattern = self.query("key")
        if pattern is None:
            return None
        compiled = self.ctx.plugins.hook.compile_filter(pattern=pattern)
        if compiled is None:
            raise plugin_required("?key=", "filter")
        return compiled.match

    # --- history -------------------------------------------------------------

    async def _open(self, history: History, since: int | None, head: int) -> None:
        """Pin and read the first batch (410 while nothing is sent yet), then send the headers.

        ``since`` None: from the oldest retained record. A compaction that
        retires it between the look and the read just means looking again.
        """
        loop = asyncio.get_running_loop()
        for attempt in range(3):
            after = since
            if after is None:
                after = await loop.run_in_executor(None, history.first_record_seq) - 1
            self._sent = after
            if after >= head:
                break  # nothing retained to read (or a since beyond the head: wait for it live)
            self._read_from(history, after)
            try:
                first = await self._read(head)
            except HistoryGone:
                self._release_history()
                if since is None and attempt < 2:
                    continue
                oldest = await loop.run_in_executor(None, history.first_record_seq)
                raise Gone(
                    f"records after seq {after} are no longer retained (compacted); the oldest "
                    f"retained record is seq {oldest}: start from since={oldest - 1}"
                ) from None
            await self._start()
            await self._send(first)
            return
        await self._start()

    def _read_from(self, history: History, after: int) -> None:
        """Pin the records after ``after`` (kept from compaction) and open a cursor there."""
        if self._pin is None:
            self._pin = self.ctx.journal.pin(after)
        else:
            self.ctx.journal.move_pin(self._pin, after)
        self._cursor = HistoryCursor(history, after)

    async def _read(self, upto: int) -> list[Record]:
        assert self._cursor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, self._cursor.batch, upto, self.HISTORY_BATCH_RECORDS, self.HISTORY_BATCH_BYTES
        )

    async def _catch_up(self, upto: int) -> None:
        """Send the retained records up to ``upto`` (the first batch was sent by ``_open``)."""
        while self._sent < upto:
            if self._gone:
                raise _StreamEnded
            if self._end is not None:
                await self._end_stream(*self._end)
            try:
                batch = await self._read(upto)
            except HistoryGone:
                # Only if a compaction began before the pin was taken; the
                # client has part of the records, so say so in-stream.
                await self._end_stream(
                    "gone", f"records after seq {self._sent} are no longer retained (compacted)"
                )
            if not batch:
                self.ctx.report_error("feed_history_short")
                await self._end_stream(
                    "internal_error",
                    f"the journal on disk ends before seq {upto}; resume with since={self._sent}",
                )
            await self._send(batch)

    def _release_history(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
        if self._pin is not None:
            self.ctx.journal.unpin(self._pin)
            self._pin = None

    # --- live ----------------------------------------------------------------

    def _subscribe(self) -> None:
        self.store.observers.append(self._on_record)
        self._subscribed = True

    def _on_record(self, record: Record) -> None:
        """Store observer, on the loop inside the commit: cheap, and never raises."""
        try:
            if self._overflowed or self._gone:
                return
            if self._match is not None and not record.touches(self._match):
                return
            self._live.append(record)
            self._live_bytes += record.size
            if len(self._live) > self.LIVE_BUFFER_RECORDS or self._live_bytes > self.LIVE_BUFFER_BYTES:
                self._clear_live()  # memory stays bounded; see _follow_on for what follows
                self._overflowed = True
                self._overflow_blocked = self._flushing
            self._wake.set()
        except Exception as exc:  # noqa: BLE001 - must not fail the commit
            self.ctx.report_error("feed_observer", exc)

    async def _follow_on(self, history: History, head: int) -> None:
        """Catch up to ``head``, then send commits as they come; ends only by raising.

        An overflowing buffer is dropped and its records read from disk, where
        the pin keeps them, unless it overflowed while this client, already
        caught up once, was still taking earlier bytes: then it is too slow.
        """
        target = head
        caught_up = False
        while True:
            if self._gone or self._finished:
                raise _StreamEnded
            if self._end is not None:
                await self._end_stream(*self._end)
            if self._sent < target:
                if self._cursor is None:
                    self._read_from(history, self._sent)
                await self._catch_up(target)
                continue
            if self._overflowed:
                if caught_up and self._overflow_blocked:
                    await self._end_stream(
                        "too_slow",
                        f"more than {self.LIVE_BUFFER_RECORDS} records or {self.LIVE_BUFFER_BYTES} "
                        "bytes were committed while this client was still reading earlier ones; "
                        f"resume with since={self._sent}",
                    )
                # Restart the buffer at the head in this loop turn; read up to it from disk.
                self._clear_live()
                self._overflowed = False
                target = self.ctx.journal.last_seq
                continue
            if self._cursor is not None:
                self._cursor.close()  # caught up: records come from the buffer now
                self._cursor = None
            caught_up = True
            if self._live:
                batch = [record for record in self._live if record.seq > self._sent]
                self._clear_live()
                await self._send(batch, matched=True)
                continue
            await self._wait_for_records()

    async def _wait_for_records(self) -> None:
        self._wake.clear()
        self._idle = True
        try:
            if self._sse:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.HEARTBEAT_SECONDS)
                except TimeoutError:
                    self.write(b": keepalive\n\n")
                    await self._flush()
            else:
                await self._wake.wait()
        finally:
            self._idle = False

    def _clear_live(self) -> None:
        self._live.clear()
        self._live_bytes = 0

    def _end_from_outside(self) -> None:
        """Called by ``AppContext.end_streams`` when the server stops: end now, with a reason line."""
        self._end = ("unavailable", f"kvd is shutting down; resume with since={self._sent}")
        self._wake.set()
        if self._idle and not self._finished and not self._gone:
            # The server closes connections right after this: write the line now.
            try:
                self.write(self._reason_line(*self._end))
                self.finish()
            except StreamClosedError:
                self._gone = True

    # --- output --------------------------------------------------------------

    async def _start(self) -> None:
        """Send the headers now: once a follower has them, its subscription is in place."""
        self.set_header("Content-Type", SSE_TYPE if self._sse else NDJSON_TYPE)
        self.set_header("X-Accel-Buffering", "no")  # proxies: pass records on at once
        self._started = True
        await self._flush()

    async def _send(self, records: list[Record], matched: bool = False) -> None:
        """Write records (those the key pattern keeps), flush, and move the feed's position."""
        if not records:
            return
        match = None if matched else self._match
        if self._sse:
            parts = [
                b"id: %d\ndata: %s\n\n" % (record.seq, record.line.rstrip(b"\n"))
                for record in records if match is None or record.touches(match)
            ]
        else:
            parts = [record.line for record in records if match is None or record.touches(match)]
        if parts:
            self.write(b"".join(parts))
            await self._flush()
        self._sent = records[-1].seq
        if self._pin is not None:
            self.ctx.journal.move_pin(self._pin, self._sent)

    async def _flush(self) -> None:
        """Flush, waiting at most ``STALL_SECONDS`` for the client to take the bytes."""
        if self._gone or self._finished:
            raise _StreamEnded
        self._flushing = True
        try:
            # StreamClosedError when the client hung up
            flushed = await flushed_within(self, self.STALL_SECONDS, "a /journal stream")
        finally:
            self._flushing = False
        if not flushed:
            self._gone = True
            raise _StreamEnded

    def _reason_line(self, code: str, message: str) -> bytes:
        body = error_body(code, message)
        return b"event: error\ndata: " + body + b"\n\n" if self._sse else body + b"\n"

    async def _end_stream(self, code: str, message: str) -> None:
        """Write a last line saying why the stream ends, then end it."""
        if not self._started:
            await self._start()
        self.write(self._reason_line(code, message))
        try:
            await self._flush()
        except StreamClosedError:
            self._gone = True
        raise _StreamEnded

    # --- bookkeeping ---------------------------------------------------------

    def _stop_counting_in_flight(self) -> None:
        """A follower never finishes by itself: SIGTERM's drain must not wait for it."""
        if getattr(self, "_counted", False):
            self.ctx.in_flight -= 1
            self._counted = False

    def _unsubscribe(self) -> None:
        """Stop buffering commits; safe anywhere but inside a commit, and more than once."""
        if self._subscribed:
            self._subscribed = False
            try:
                self.store.observers.remove(self._on_record)
            except ValueError:
                pass
        self.ctx.streams.discard(self._end_from_outside)
        self._clear_live()

    def _release(self) -> None:
        """Everything the stream holds. Only from ``get``: a history read may be running in a thread."""
        self._unsubscribe()
        self._release_history()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._gone = True
        self._unsubscribe()
        self._wake.set()  # get() wakes up and releases the pin and cursor itself
