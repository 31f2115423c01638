"""Answers given below RequestHandler: the hot read and write paths.

The hot read path is a plain ``GET /keys/{id}``; the hot write path a plain
``PUT /keys/{id}`` (no query, no conditions, no plugin that authenticates or
validates writes). Both only ever give the success answer themselves (and a
write the 503 of a journal that refuses it); anything else is handed to
``KeyHandler``, which owns every other answer.

Why: a GET of an existing key spends most of its CPU in tornado.web's
per-request machinery (handler set-up, header bookkeeping, flush), not in
kvd. For the common case this delegate writes the 200 or 304 straight to the
connection, measured at about 1.4x less CPU per request. Every other case
(an absent or bad key, a query string, a body, auth or read-rewriting
plugins, a store still replaying) goes to ``KeyHandler``, which owns every
other answer, so no response is defined twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tornado import httputil
from tornado.iostream import StreamClosedError

from kvd.errors import KvdError
from kvd.handlers.base import (
    JSON_TYPE,
    UTF8_CHARSETS,
    error_body,
    http_date,
    media_type_and_charset,
    requested_key,
)
from kvd.handlers.keys import (
    check_key,
    encode_value,
    etag,
    etag_matches,
    key_body,
    missing_key,
    parse_json,
)
from kvd.log.format import OP_DELETE, OP_PUT, Record
from kvd.model import Change, Entry

if TYPE_CHECKING:
    from kvd.app import AppContext
    from kvd.handlers import KvdApplication

PREFIX = "/keys/"
ENDPOINT = "/keys/{id}"
_OK = httputil.ResponseStartLine("HTTP/1.1", 200, "OK")
_NOT_MODIFIED = httputil.ResponseStartLine("HTTP/1.1", 304, "Not Modified")


def is_plain_key_read(ctx: AppContext, request: httputil.HTTPServerRequest) -> bool:
    """Whether the fast path may try this request (it still falls back when it must)."""
    return (
        request.method == "GET"
        and not request.query
        and request.path.startswith(PREFIX)
        and len(request.path) > len(PREFIX)
        and "If-Match" not in request.headers  # KeyHandler evaluates it
        and ctx.plain_reads
        and ctx.store.ready
    )


class FastKeyRead(httputil.HTTPMessageDelegate):
    def __init__(self, application: KvdApplication, request: httputil.HTTPServerRequest) -> None:
        self.application = application
        self.request = request
        self.ctx = application.ctx
        self.has_body = False

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> None:
        self.start_line = start_line
        self.headers = headers

    def data_received(self, chunk: bytes) -> None:
        self.has_body = True  # a GET with a body is unusual: let KeyHandler judge it

    def finish(self) -> None:
        entry, key = None, ""
        if not self.has_body:
            try:
                key = check_key(requested_key(self.request))
            except KvdError:
                key = ""
            if key:
                entry = self.ctx.store.get(key)
        if entry is None:
            self._fall_back()
            return
        status, body, fields = read_answer(key, entry, self.headers.get("If-None-Match"))
        headers = httputil.HTTPHeaders(fields)
        connection = self.request.connection
        assert connection is not None
        connection.write_headers(_OK if status == 200 else _NOT_MODIFIED, headers, body)
        connection.finish()
        self.ctx.request_done("GET", ENDPOINT, status, self.request.request_time())

    def on_connection_close(self) -> None:
        pass

    def _fall_back(self, body: bytes = b"") -> None:
        """Hand the request to the URL table (KeyHandler), as if we had never looked."""
        delegate = self.application.route(self.request)
        delegate.headers_received(self.start_line, self.headers)
        if body:
            delegate.data_received(body)
        delegate.finish()


Answer = tuple[int, bytes, dict[str, str]]  # status, body, headers


def answer_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus what every fast answer carries."""
    headers["Cache-Control"] = "no-store"
    headers["Date"] = http_date()
    return headers


def error_answer(exc: KvdError) -> Answer:
    """A client or journal error as KeyHandler would give it: JSON body, the error's headers."""
    return exc.status, error_body(exc.code, exc.message), answer_headers(
        {"Content-Type": JSON_TYPE, **exc.headers}
    )


_REASONS = {status: reason.encode() for status, reason in httputil.responses.items()}


def encode_answer(
    status: int, body: bytes, headers: dict[str, str], close: bool, head_only: bool = False
) -> bytes:
    """An answer as HTTP/1.1 bytes, for a connection kvd writes itself (the wire, a refusal).

    ``head_only``: the answer to a HEAD, which is GET's (its Content-Length too) without
    the body.
    """
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
    head.extend(f"{name}: {value}".encode() for name, value in headers.items())
    if "Content-Length" not in headers and status not in (204, 304):
        head.append(b"Content-Length: %d" % len(body))
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + (b"" if head_only else body)


def read_answer(key: str, entry: Entry | None, if_none_match: str | None) -> Answer:
    """A plain GET of ``key``: 200, 304 on a matching tag, or 404 without an entry."""
    if entry is None:
        return error_answer(missing_key(key))
    tag = etag(entry)
    if etag_matches(if_none_match, tag):
        return 304, b"", answer_headers({"ETag": tag})
    body = key_body(key, entry.value)
    return 200, body, answer_headers(
        {"Content-Type": JSON_TYPE, "Content-Length": str(len(body)), "ETag": tag}
    )


def writes_plainly(ctx: AppContext) -> bool:
    """Whether no plugin or setting stands between a plain PUT and the journal."""
    return (
        ctx.plain_reads
        and not ctx.writes_validated
        and not ctx.config.journal.record_client
        and ctx.store.ready
    )


def is_json_write(content_type: str, conditional: bool, encoded: bool) -> bool:
    """A JSON body without If-Match/If-None-Match or Content-Encoding: what the fast write
    paths take (KeyHandler judges conditions and encodings)."""
    media_type, charset = media_type_and_charset(content_type)
    return not conditional and not encoded and media_type == JSON_TYPE and charset in UTF8_CHARSETS


def is_plain_key_write(ctx: AppContext, request: httputil.HTTPServerRequest) -> bool:
    """Whether the fast write path may try this request (it still falls back when it must)."""
    if not (
        request.method == "PUT"
        and not request.query
        and request.path.startswith(PREFIX)
        and len(request.path) > len(PREFIX)
        and writes_plainly(ctx)
    ):
        return False
    headers = request.headers
    return is_json_write(
        headers.get("Content-Type", ""), "If-Match" in headers or "If-None-Match" in headers,
        "Content-Encoding" in headers,
    )


def put_then(
    application: KvdApplication, key: str, value: bytes, answer: Callable[[int, bytes, dict[str, str]], None]
) -> None:
    """Journal a plain PUT of ``key`` and call ``answer(status, body, headers)`` once it is
    durable (201/200), or with the journal's error (e.g. 503). Counted in flight until then."""
    created = False

    def prepare() -> Change:
        # No await between the check and the append: 201 vs 200 is exact.
        nonlocal created
        created = application.ctx.store.current(key) is None
        return Change(op=OP_PUT, set={key: value})

    def success(record: Record) -> Answer:
        return 201 if created else 200, key_body(key, value), answer_headers(
            {"Content-Type": JSON_TYPE, "ETag": f'"{record.seq}"'}
        )

    _write_then(application, prepare, success, answer)


def delete_then(
    application: KvdApplication, key: str, answer: Callable[[int, bytes, dict[str, str]], None]
) -> None:
    """Journal a plain DELETE of ``key``: ``answer`` gets 204 once it is durable, a 404 when the
    key is absent (as writers see it: nothing is journaled), or the journal's error."""
    _write_then(
        application, lambda: Change(op=OP_DELETE, keys=(key,)),
        lambda record: (204, b"", answer_headers({})), answer,
    )


def _write_then(
    application: KvdApplication, prepare: Callable[[], Change], success: Callable[[Record], Answer],
    answer: Callable[[int, bytes, dict[str, str]], None],
) -> None:
    """Journal the change ``prepare`` builds, then ``answer`` with ``success(record)`` or the
    error. Counted in flight until answered."""
    ctx = application.ctx
    ctx.in_flight += 1  # until answered: SIGTERM drains it

    def written(result: Record | KvdError) -> None:
        ctx.in_flight -= 1
        answer(*(error_answer(result) if isinstance(result, KvdError) else success(result)))

    store = ctx.store
    if not store.answers_in_place:
        task = asyncio.ensure_future(_commit(ctx, prepare, written))
        application.writes.add(task)
        task.add_done_callback(application.writes.discard)
        return
    try:
        # Answered from the journal's callback, in the loop pass that
        # applies the record: no task to start, no waiter to wake.
        store.write_then(prepare, written)
    except KvdError as exc:
        written(exc)
    except BaseException:
        ctx.in_flight -= 1
        raise


async def _commit(
    ctx: AppContext, prepare: Callable[[], Change], written: Callable[[Record | KvdError], None]
) -> None:
    """Where a write may be decided again (a shared journal): through ``Store.write``."""
    try:
        record = await ctx.store.write(prepare)
    except KvdError as exc:
        written(exc)
    else:
        written(record)


class FastKeyWrite(FastKeyRead):
    """A plain PUT of one key: parse, journal, answer 201/200 without a RequestHandler."""

    def __init__(self, application: KvdApplication, request: httputil.HTTPServerRequest) -> None:
        super().__init__(application, request)
        self.chunks: list[bytes] = []

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        body = b"".join(self.chunks)
        limit = self.ctx.config.server.max_value_bytes
        try:
            key = check_key(requested_key(self.request))
            value = encode_value(key, parse_json(body, 0), limit)
        except KvdError:
            self._fall_back(body)  # KeyHandler gives the 400/413 and its message
            return
        put_then(self.application, key, value, self._answer)

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        connection = self.request.connection
        assert connection is not None
        all_headers = httputil.HTTPHeaders(headers)
        all_headers["Content-Length"] = str(len(body))
        start = httputil.ResponseStartLine("HTTP/1.1", status, httputil.responses[status])
        try:
            connection.write_headers(start, all_headers, body)
            connection.finish()
        except StreamClosedError:
            pass  # the client left; the write stands, like any answered-too-late write
        self.ctx.request_done("PUT", ENDPOINT, status, self.request.request_time())
