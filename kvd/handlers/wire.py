"""kvd's own HTTP/1.1 connections for the hot paths, with tornado behind them for the rest.

Why: on a plain ``GET`` or ``PUT /keys/{id}`` most of kvd's CPU went to
tornado's per-request machinery (IOStream reads, header parsing in Python,
the HTTP1Connection coroutine) even below RequestHandler (``kvd.handlers.fast``).
An asyncio protocol on uvloop's C transport answers the same request for a
fraction of that (a bare protocol did about 13x tornado's PUTs per second on
this machine; see docs/benchmarks.md for kvd's own figures).

What a connection answers itself: GET, HEAD, PUT and DELETE of ``/keys/{id}``
that arrive whole and in the plainest form (HTTP/1.1 with one Host, no query, a
Content-Length body on PUT with a JSON content type and no Content-Encoding, no
body otherwise, no conditions on a write, at most If-None-Match on a read), and
only their success answers, a 404 and a write's journal error, built by the same
functions ``kvd.handlers.fast`` and KeyHandler use. On anything else (another path,
an absent or bad key, a bad body, a chunked or unfinished body, HTTP/1.0, an
unusual header) the connection is handed to tornado's HTTPServer together
with the bytes not yet answered, and stays there: tornado and the URL table
own every other answer, so none is written twice. TLS listeners use tornado
alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from kvd.errors import KvdError
from kvd.handlers.accept import add_accept_handler
from kvd.handlers.base import key_in_path
from kvd.handlers.fast import (
    ENDPOINT,
    delete_then,
    encode_answer,
    is_json_write,
    put_then,
    read_answer,
    writes_plainly,
)
from kvd.handlers.keys import check_key, encode_value, parse_json

if TYPE_CHECKING:
    from kvd.handlers import KvdApplication

log = logging.getLogger("kvd.wire")

PREFIX = b"/keys/"
HEAD_END = b"\r\n\r\n"
READS, WRITES = (b"GET", b"HEAD"), (b"PUT", b"DELETE")
HOT_STARTS = tuple(method + b" " + PREFIX for method in READS + WRITES)
PEEK_BYTES = 4096  # what a connection's first request is judged by
HOLD_WHILE_ANSWERING = 1 << 20  # stop reading a pipelining client with this much unanswered
# Answers a connection may have queued for a client that does not read them before it
# stops answering (the transport calls pause_writing above HIGH, resume_writing below LOW).
# A client that pipelines reads of a large value and reads nothing thus holds at most
# this plus one answer, not one answer per request it sent.
WRITE_HIGH, WRITE_LOW = 1 << 16, 1 << 14  # asyncio's defaults, stated
# Headers that change how a hot request is framed or answered, and Host, which tornado
# requires on HTTP/1.1; a second copy of any of them sends the request to tornado,
# which judges it.
_WATCHED = frozenset(
    (b"content-length", b"transfer-encoding", b"content-type", b"content-encoding", b"if-match",
     b"if-none-match", b"expect", b"connection", b"host")
)


@dataclass(slots=True)
class HotRequest:
    """A request this module may answer: method, key path, watched headers, body."""

    method: bytes
    path: bytes
    headers: dict[bytes, bytes]
    body: bytes
    size: int  # bytes of the request in the buffer, head and body
    close: bool


def parse_hot_request(
    buffer: bytearray, max_body: int, max_head: int
) -> HotRequest | None | Literal[False]:
    """The next request in ``buffer`` if it is a whole, plain hot request; ``None`` when
    more bytes are needed to tell; ``False`` when tornado must take it."""
    end = buffer.find(HEAD_END)
    if end < 0:
        # Tornado also ends a head at a bare LF's empty line (its \r?\n\r?\n), which
        # never holds HEAD_END: waiting for one would leave that request unanswered.
        # And it answers the 431 for a head over the limit, whole or not.
        too_long = len(buffer) > max_head
        return False if too_long or b"\n\n" in buffer or b"\n\r\n" in buffer else None
    if end + len(HEAD_END) > max_head:
        return False  # tornado answers the 431 (a head that came whole in one read, too)
    head = bytes(buffer[:end])
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        return False  # a bare CR or LF: let the full parser decide
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
        return False
    method, target = request_line[0], request_line[1]
    if (method not in READS + WRITES or not target.startswith(PREFIX) or len(target) == len(PREFIX)
            or b"?" in target or b"#" in target):
        return False
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or b" " in name or b"\t" in name:
            return False  # folded or malformed: tornado answers it
        name = name.lower()
        if name in _WATCHED:
            if name in headers:
                return False
            headers[name] = value.strip(b" \t")
    if b"transfer-encoding" in headers or b"expect" in headers or b"host" not in headers:
        return False
    connection = headers.get(b"connection", b"keep-alive").lower()
    if connection not in (b"keep-alive", b"close"):
        return False
    length_field = headers.get(b"content-length", b"0")
    if not length_field.isdigit():
        return False
    length = int(length_field)
    if method != b"PUT" and length:
        return False  # a body on a read or a DELETE: KeyHandler judges it
    if method == b"PUT" and (b"content-length" not in headers or length > max_body):
        return False
    start = end + len(HEAD_END)
    if len(buffer) < start + length:
        return False  # an unfinished body: tornado reads it, under its body deadline
    body = bytes(buffer[start:start + length])
    return HotRequest(method, target[len(PREFIX):], headers, body, start + length, connection == b"close")


def is_plain_read(request: HotRequest) -> bool:
    """A GET or HEAD the wire answers: without If-Match, which KeyHandler evaluates."""
    return b"if-match" not in request.headers


def is_plain_write(request: HotRequest) -> bool:
    """A PUT or DELETE the wire answers (plugins permitting): without conditions, and
    for a PUT, with a JSON body and no Content-Encoding."""
    headers = request.headers
    conditional = b"if-match" in headers or b"if-none-match" in headers
    if request.method == b"DELETE":
        return not conditional
    return is_json_write(
        headers.get(b"content-type", b"").decode("latin-1"), conditional, b"content-encoding" in headers
    )


def starts_hot(first: bytes, max_body: int, max_head: int) -> bool:
    """Whether a connection's first bytes begin a request the wire answers (as far as
    they tell: an unfinished head is judged by its request line)."""
    parsed = parse_hot_request(bytearray(first), max_body, max_head)
    if isinstance(parsed, HotRequest):
        return is_plain_read(parsed) if parsed.method in READS else is_plain_write(parsed)
    if parsed is False:
        return False
    line = first.split(b"\r\n", 1)[0]
    return b"?" not in line and any(
        start.startswith(line) or line.startswith(start) for start in HOT_STARTS
    )


class PrefixedIOStream(IOStream):
    """An IOStream that first reads back bytes a wire connection took but did not answer."""

    def __init__(self, sock: socket.socket, prefix: bytes, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._prefix = memoryview(prefix)
        # The whole prefix in one read: tornado stops reading a head at max_header_size
        # and, when exactly that much came without its end, waits for the socket, which
        # holds nothing more when the rest is still in the prefix (a 64-128 KiB head
        # went unanswered). One read lets it judge the head whole, as for any client.
        self._chunk_size = self.read_chunk_size
        self.read_chunk_size = max(self.read_chunk_size, len(prefix))

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        if self._prefix:
            count = min(len(buf), len(self._prefix))
            buf[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            if not self._prefix:
                self.read_chunk_size = self._chunk_size
            return count
        return super().read_from_fd(buf)


class WireConnection(asyncio.Protocol):
    """One client connection, until it asks for something only tornado answers."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.ctx = wire.application.ctx
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answering = False  # a PUT waits for the journal: later requests wait their turn
        self.handing_over = False
        self.idle_since = time.monotonic()  # None while a request is being answered
        self.reading = True
        self.writing_paused = False  # the transport holds WRITE_HIGH unsent: answer nothing more
        # Kept by Wire._sweep: the unsent bytes it saw last, and since when they have not
        # shrunk (a client that reads nothing for idle_timeout is cut off).
        self.unsent = 0
        self.unsent_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.wire.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.wire.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.answering and not self.handing_over and not self.writing_paused:
            self.serve()
        elif len(self.buffer) > HOLD_WHILE_ANSWERING:
            self.pause_reading()

    def serve(self) -> None:
        """Answer what the buffer holds, in order, until a PUT waits, the client falls
        behind reading the answers, more bytes are needed, or tornado must take over."""
        application = self.wire.application
        limits = self.ctx.config.server
        while self.buffer and self.transport is not None and not self.transport.is_closing():
            if self.writing_paused:
                # Answering on would queue an answer per request the client sent (a 35 KB
                # pipeline of reads of a 900 KB value held 850 MiB). Its requests wait
                # in the kernel until resume_writing serves on.
                return
            if not application.fast_paths:
                self.hand_over()
                return
            parsed = parse_hot_request(self.buffer, limits.max_body_bytes, limits.max_header_bytes)
            if parsed is None:
                if not self.reading:  # held while a PUT waited: the rest of the head is to come
                    self.resume_reading()
                return
            if parsed is False or not self.answer(parsed):
                self.hand_over()
                return
            del self.buffer[:parsed.size]
            if self.answering:
                return
            self.idle_since = time.monotonic()  # the next head may take idle_timeout
        self.idle_since = time.monotonic()
        if not self.reading and not self.writing_paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and self.transport is not None and not self.handing_over:
            self.reading = True
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark: serve() answers nothing more
        and stops reading until resume_writing."""
        self.writing_paused = True
        self.pause_reading()

    def answer(self, request: HotRequest) -> bool:
        """Answer ``request`` (now, or once its write is durable); False if tornado must."""
        ctx = self.ctx
        is_read = request.method in READS
        if is_read:
            allowed = ctx.plain_reads and ctx.store.ready and is_plain_read(request)
        else:
            allowed = writes_plainly(ctx) and is_plain_write(request)
        if not allowed:
            return False
        try:
            key = check_key(key_in_path(request.path))
        except KvdError:
            return False
        started = time.perf_counter()
        if is_read:  # a miss too is answered here: common enough (a cache's) to keep on the wire
            if_none_match = request.headers.get(b"if-none-match")
            status, body, fields = read_answer(
                key, ctx.store.get(key), if_none_match.decode("latin-1") if if_none_match is not None else None
            )
            head_only = request.method == b"HEAD"
            self.send(encode_answer(status, body, fields, request.close, head_only), request.close)
            ctx.request_done("HEAD" if head_only else "GET", ENDPOINT, status, time.perf_counter() - started)
            return True
        value = b""
        if request.method == b"PUT":
            try:
                value = encode_value(key, parse_json(request.body, 0), ctx.config.server.max_value_bytes)
            except KvdError:
                return False  # KeyHandler gives the 400/413 and its message
        self.answering = True
        self.idle_since = None
        method = request.method.decode()
        waiting = False  # whether the answer comes later, from the journal

        def answer(status: int, body: bytes, fields: dict[str, str]) -> None:
            self.send(encode_answer(status, body, fields, request.close), request.close)
            ctx.request_done(method, ENDPOINT, status, time.perf_counter() - started)
            self.answering = False
            # An answer given at once (a 404, or a refusal after a failed fsync) returns to
            # serve(), which goes on; only a later one resumes it. Calling serve() from here
            # at once would take this same request, not yet removed, again.
            if waiting and not self.handing_over:
                self.serve()

        if request.method == b"PUT":
            put_then(self.wire.application, key, value, answer)
        else:
            delete_then(self.wire.application, key, answer)
        waiting = True
        return True

    def send(self, data: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left; a write stands, like any answered-too-late write
        transport.write(data)
        if close:
            self.buffer.clear()
            transport.close()

    # --- handing the connection to tornado -----------------------------------------

    def hand_over(self) -> None:
        """Give the socket and the unanswered bytes to tornado's HTTPServer, once every
        answer given here has left (so answers stay in request order)."""
        transport = self.transport
        if transport is None or self.handing_over:
            return
        self.pause_reading()
        self.handing_over = True
        self.idle_since = None
        if transport.get_write_buffer_size():
            transport.set_write_buffer_limits(high=0)  # resume_writing says when it drained
            return
        self._move_to_tornado()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.handing_over:
            if self.transport is not None and not self.transport.get_write_buffer_size():
                self._move_to_tornado()
        elif not self.answering:
            self.serve()

    def _move_to_tornado(self) -> None:
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return
        raw = transport.get_extra_info("socket")
        address = transport.get_extra_info("peername")
        try:
            duplicate = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError as exc:
            log.warning("could not hand a connection to tornado: %s", exc)
            transport.abort()
            return
        self.transport = None
        transport.abort()  # closes this descriptor; the duplicate keeps the connection
        self.wire.connections.discard(self)
        self.wire.serve_on_tornado(duplicate, address, bytes(self.buffer))
        self.buffer.clear()


class Wire:
    """Accepts on plain-HTTP sockets and gives each connection to a WireConnection or to tornado.

    The first bytes decide, peeked and left in the socket (``starts_hot``): a connection
    whose first request the wire would answer gets a WireConnection (on the loop's own
    transport); any other goes to tornado's HTTPServer directly. Handing over a connection that a
    uvloop transport has served costs that connection a lot later on (a listing's p99
    went from 0.2 s to 1.3 s at 64 connections, though the sockets' options were the
    same), so only a connection that changes its kind midway takes that road.
    """

    def __init__(self, application: KvdApplication, tornado: HTTPServer) -> None:
        self.application = application
        self.tornado = tornado
        self.connections: set[WireConnection] = set()
        self.sockets: list[socket.socket] = []
        self._stop_accepting: list[Callable[[], None]] = []
        self._undecided: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self._starting: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def listen(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            self.sockets.append(sock)
            self._stop_accepting.append(add_accept_handler(sock, self._accepted))

    def stop(self) -> None:
        """Stop accepting; open connections go on until ``close_all_connections``."""
        for stop_accepting in self._stop_accepting:
            stop_accepting()
        for sock in self.sockets:
            sock.close()
        self._stop_accepting, self.sockets = [], []
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _accepted(self, conn: socket.socket, address: Any) -> None:
        """Wait for the connection's first bytes (at most ``idle_timeout``), then decide."""
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweep()
        fd = conn.fileno()
        timeout = self.application.ctx.config.server.idle_timeout
        self._undecided[fd] = (conn, loop.call_later(timeout, self._give_up, fd))
        loop.add_reader(fd, self._decide, fd, address)

    def _give_up(self, fd: int) -> None:
        conn, _ = self._undecided.pop(fd)
        asyncio.get_running_loop().remove_reader(fd)
        conn.close()

    def _decide(self, fd: int, address: Any) -> None:
        loop = asyncio.get_running_loop()
        conn, timer = self._undecided.pop(fd)
        loop.remove_reader(fd)
        timer.cancel()
        try:
            first = conn.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            self._accepted(conn, address)  # woken for nothing: wait again
            return
        except OSError:
            conn.close()
            return
        if not first:
            conn.close()  # gone before a byte
            return
        limits = self.application.ctx.config.server
        if starts_hot(first, limits.max_body_bytes, limits.max_header_bytes):
            task = loop.create_task(loop.connect_accepted_socket(lambda: WireConnection(self), conn))
            self._starting.add(task)
            task.add_done_callback(self._started)
            return
        self.serve_on_tornado(conn, address)

    def serve_on_tornado(self, sock: socket.socket, address: Any, unanswered: bytes = b"") -> None:
        """Tornado's HTTPServer serves ``sock`` from here on, ``unanswered`` read first."""
        stream = PrefixedIOStream(sock, unanswered, max_buffer_size=self.tornado.max_buffer_size,
                                  read_chunk_size=self.tornado.read_chunk_size)
        # A socket the loop's transport had has Nagle's algorithm off; tornado keeps it on
        # between answers (and off only to finish one): leave it as tornado expects it.
        stream.set_nodelay(False)
        self.tornado.handle_stream(stream, address)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not serve a connection: %s", task.exception())

    def receiving(self) -> int:
        """Connections with a request whose head has come and whose body is still coming:
        in flight, as tornado's are (``kvd.handlers.InFlight``), so SIGTERM waits for them."""
        return sum(
            1 for connection in self.connections
            if not connection.answering and not connection.handing_over
            and HEAD_END in connection.buffer
        )

    def close_all_connections(self) -> None:
        for fd in list(self._undecided):
            self._give_up(fd)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        self.connections.clear()

    def _sweep(self) -> None:
        """Close connections idle longer than ``idle_timeout`` (as tornado does for its own:
        the time a client may take to send the next request's head), and abort those whose
        client has read none of the answers waiting for it for as long.

        A graceful close waits for the answers to leave, which they never do for a client
        that stopped reading: such a connection is reset, and its answers dropped.
        """
        timeout = self.application.ctx.config.server.idle_timeout
        now = time.monotonic()
        for connection in list(self.connections):
            transport = connection.transport
            if transport is None:
                continue
            unsent = transport.get_write_buffer_size()
            if unsent:
                if unsent != connection.unsent:  # the client read some, or was sent more
                    connection.unsent, connection.unsent_since = unsent, now
                elif now - connection.unsent_since > timeout:
                    _reset(transport)
                continue
            if connection.unsent:  # its answers have all left: the next head's time starts
                connection.unsent = 0
                if connection.idle_since is not None:
                    connection.idle_since = now
            since = connection.idle_since
            if since is not None and now - since > timeout:
                transport.close()
        interval = max(0.05, min(1.0, timeout / 4))
        self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)


def _reset(transport: asyncio.Transport) -> None:
    """Drop the connection and what it has not sent: a reset, not a FIN queued behind
    answers the client will not read (the kernel would keep those for minutes)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass  # closed meanwhile: abort() below is all there is to do
    transport.abort()


_LINGER_ZERO = struct.pack("ii", 1, 0)
