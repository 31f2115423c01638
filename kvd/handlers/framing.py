"""JSON answers to requests no handler takes: ones Tornado cannot parse, and bodies too large.

Tornado refuses a malformed request (two Content-Lengths, a folded header, a
bad chunk size, a garbled request line) before any handler exists: it writes
a bare ``400 Bad Request`` with no body and closes the connection. A head
larger than ``server.max_header_bytes`` gets no answer at all, only a closed
connection. Every other kvd error is ``{"error": {"code", "message"}}``, so a
client would need a second way to read these.

``KvdHTTPServer`` gives each connection's stream a ``write`` that swaps that
exact bare answer for the JSON one, and a ``close`` that answers before
closing when a read overflowed its limit: 431 for the head, 400 for a chunk-size
line. Both hook points are Tornado's own internals (the literal bytes of its
answer, the error it closes with); tests/test_framing.py notices if a Tornado
upgrade moves them. ``refuse`` answers and closes a stream no handler owns:
the 413 for a declared body over the limit (``BodyTooLarge``) uses it too.
"""

from __future__ import annotations

import asyncio
import socket
from asyncio import Future
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, UnsatisfiableReadError

from kvd.errors import BadRequest, HeaderTooLarge, KvdError, PayloadTooLarge
from kvd.handlers.accept import add_accept_handler
from kvd.handlers.fast import ENDPOINT, PREFIX, encode_answer, error_answer

if TYPE_CHECKING:
    from kvd.app import AppContext
    from kvd.handlers import KvdApplication

TORNADO_BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"  # http1connection._read_message_inner
MALFORMED = BadRequest("malformed HTTP request (framing, request line or headers)")
# Tornado's max_body_size: kvd refuses large bodies itself, with a 413 (BodyTooLarge from
# the Content-Length, ChunkedBodyLimit as chunks arrive), where tornado answers a bare 400.
UNLIMITED_BODY = 1 << 62
HEAD_TOO_LARGE = HeaderTooLarge("request head larger than server.max_header_bytes")


def refusal(error: KvdError) -> bytes:
    """A whole answer, head and body, after which the connection closes."""
    return encode_answer(*error_answer(error), close=True)


def refuse(stream: IOStream, error: KvdError) -> None:
    """Answer ``error`` on a stream no handler owns (detached, or never handed one), then close it."""

    def close(written: Future[None]) -> None:
        written.exception()  # a client that left before the answer: nothing more to do
        if stream.socket is not None:
            _linger(stream.socket)
        stream.close()

    stream.write(refusal(error)).add_done_callback(close)


def declares_too_large_body(ctx: AppContext, request: httputil.HTTPServerRequest) -> bool:
    declared = request.headers.get("Content-Length", "")
    return declared.isdigit() and int(declared) > ctx.config.server.max_body_bytes


def count_refusal(ctx: AppContext, request: httputil.HTTPServerRequest, status: int) -> None:
    """Count an answer no handler gave in the request metrics, under the route's template
    (never the raw path: keys stay out of labels)."""
    endpoint = "/keys" if request.path == "/keys" else "unmatched"
    if request.path.startswith(PREFIX):
        endpoint = ENDPOINT
    ctx.request_done(request.method or "", endpoint, status, request.request_time())


class BodyTooLarge(httputil.HTTPMessageDelegate):
    """413 from the Content-Length alone: the body is never read, the connection closes.

    Detaching the stream stops tornado from reading (and refusing) the body
    itself, so the client gets kvd's JSON error rather than a bare 400.
    """

    def __init__(self, application: KvdApplication, request: httputil.HTTPServerRequest) -> None:
        self.ctx = application.ctx
        self.request = request

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> None:
        limit = self.ctx.config.server.max_body_bytes
        connection = self.request.connection
        assert isinstance(connection, HTTP1Connection)
        refuse(connection.detach(), PayloadTooLarge(f"body is larger than {limit} bytes"))
        count_refusal(self.ctx, self.request, 413)

    def data_received(self, chunk: bytes) -> None:
        pass

    def finish(self) -> None:
        pass

    def on_connection_close(self) -> None:
        pass


class ChunkedBodyLimit(httputil.HTTPMessageDelegate):
    """413 for a chunked body that grows past ``max_body_bytes``.

    A chunked body declares no length, so it cannot be refused up front like
    one with a Content-Length (``BodyTooLarge``). Tornado's own limit answers
    a bare 400, as for a malformed body, so kvd counts the bytes itself (the
    server gives tornado no limit of its own: ``UNLIMITED_BODY``) and, past
    the limit, marks the stream for a 413 and stops tornado reading.
    """

    def __init__(
        self, ctx: AppContext, inner: httputil.HTTPMessageDelegate, request: httputil.HTTPServerRequest
    ) -> None:
        self.ctx = ctx
        self.inner = inner
        self.request = request
        self.limit = ctx.config.server.max_body_bytes
        self.received = 0

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        self.received += len(chunk)
        if self.received > self.limit:
            connection = self.request.connection
            assert isinstance(connection, HTTP1Connection)
            connection.stream.kvd_refusal = PayloadTooLarge(  # type: ignore[attr-defined]
                f"body is larger than {self.limit} bytes"
            )
            count_refusal(self.ctx, self.request, 413)
            raise httputil.HTTPInputError("chunked body too large")  # tornado answers, then closes
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


class KvdHTTPServer(HTTPServer):
    """Tornado's HTTPServer, with kvd's JSON answers to requests it cannot parse."""

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        kwargs["max_body_size"] = UNLIMITED_BODY  # kvd's own limit answers 413 (see UNLIMITED_BODY)
        super().initialize(*args, **kwargs)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """As tornado's, with kvd's accept handler: it pauses at the open-files limit
        instead of spinning (kvd.handlers.accept)."""
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = add_accept_handler(sock, self._handle_connection)

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        write, close = stream.write, stream.close
        refused = False

        def write_json_errors(data: bytes | memoryview) -> Any:
            nonlocal refused
            if data == TORNADO_BARE_400:
                refused, data = True, refusal(getattr(stream, "kvd_refusal", MALFORMED))
            return write(data)

        def close_answering_an_overflow(exc_info: Any = False) -> None:
            if stream.socket is not None and (
                refused or isinstance(exc_info, UnsatisfiableReadError) and _answer_overflow(stream)
            ):
                _linger(stream.socket)  # a refusal was sent: let the client read it
            close(exc_info)

        stream.write = write_json_errors  # type: ignore[method-assign]
        stream.close = close_answering_an_overflow  # type: ignore[method-assign]
        super().handle_stream(stream, address)

    async def close_all_connections(self) -> None:
        stop_lingering()
        await super().close_all_connections()


def _answer_overflow(stream: IOStream) -> bool:
    """Answer a read that overflowed its limit, unless an answer is still being sent.

    Tornado reads a request head with a regex and a chunk-size line with a
    plain delimiter, so the read still pending says which one it was.
    """
    if stream.writing():
        return False
    error = HEAD_TOO_LARGE if stream._read_regex is not None else MALFORMED
    try:
        stream.socket.send(refusal(error))  # non-blocking, and closing next: no buffering (TLS too)
    except OSError:  # ssl.SSLError is one
        return False  # the client has gone; nothing to tell
    return True


LINGER_SECONDS = 2.0
MAX_LINGERING = 256  # past this many at once, a refused connection is closed at once
_lingering: dict[socket.socket, Callable[[], None]] = {}  # each with what ends its lingering


def _linger(sock: socket.socket) -> None:
    """Keep a refused connection open, discarding what the client still sends, until it
    closes or LINGER_SECONDS pass (nginx's lingering close).

    Closing a socket with unread bytes makes the kernel reset the connection,
    and a reset can destroy the refusal before the client has read it. A
    duplicate of the socket's descriptor outlives Tornado's close (a TLS
    socket's too: the bytes discarded need no decrypting); its write side is
    shut at once, so the client sees the end of the answer. At most
    MAX_LINGERING at once, so a flood of refused requests cannot hold
    descriptors without bound.
    """
    if len(_lingering) >= MAX_LINGERING:
        return
    try:
        lingering = socket.fromfd(sock.fileno(), sock.family, sock.type)  # a duplicate descriptor
    except OSError:
        return
    try:
        lingering.setblocking(False)
        lingering.shutdown(socket.SHUT_WR)
    except OSError:
        lingering.close()
        return
    loop = asyncio.get_running_loop()

    def finish() -> None:
        if not loop.is_closed():
            loop.remove_reader(lingering)
        deadline.cancel()
        lingering.close()
        _lingering.pop(lingering, None)

    def discard() -> None:
        try:
            if lingering.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        finish()  # the client closed (or reset) its side

    deadline = loop.call_later(LINGER_SECONDS, finish)
    loop.add_reader(lingering, discard)
    _lingering[lingering] = finish


def stop_lingering() -> None:
    """Close every lingering connection now (the server is closing its connections)."""
    for finish in list(_lingering.values()):
        finish()
