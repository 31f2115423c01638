"""Cross-cutting request behaviour: JSON errors, default headers, timing.

Every error, whatever raised it (a KvdError, tornado's own HTTPError, or an
unexpected exception), leaves through ``write_error`` as
``{"error": {"code", "message"}}``; a traceback never reaches a client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from tornado import httputil
from tornado.web import HTTPError, RequestHandler

from kvd.app import AppContext
from kvd.errors import CODES_BY_STATUS, BadRequest, KvdError, NotFound, Unavailable

log = logging.getLogger("kvd.app")

STALL_SECONDS = 60.0
"""How long a streamed response may wait for its client to read before the connection is closed."""


async def flushed_within(handler: RequestHandler, seconds: float, what: str) -> bool:
    """Flush ``handler``'s output; when the client took none of it for ``seconds``, close
    the connection (logging ``what`` was cut off) and return False. Raises
    StreamClosedError when the client hung up.

    A client that stops reading would otherwise hold its connection, and what
    the response pins, for ever: the idle timeout covers reading requests, not
    waiting on a response.
    """
    future = handler.flush()
    if not future.done():
        done, _ = await asyncio.wait([future], timeout=seconds)
        if not done:
            future.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" log
            log.info("closing %s whose client read nothing for %.0fs", what, seconds)
            handler.request.connection.close()  # type: ignore[union-attr]
            return False
    future.result()
    return True

JSON_TYPE = "application/json"
UTF8_CHARSETS = (None, "utf-8", "utf8")  # kvd reads bodies as UTF-8 only (another charset: 415)


def media_type_and_charset(content_type: str) -> tuple[str, str | None]:
    """A Content-Type's media type and ``charset`` (None without one), lower-cased and unquoted."""
    media_type, *parameters = content_type.split(";")
    charset = None
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media_type.strip().lower(), charset


def unsupported_coding(content_encoding: str | None) -> str | None:
    """The first coding of a Content-Encoding header other than ``identity`` (lower-cased),
    or None: kvd reads bodies as sent, never decompressed."""
    for coding in (content_encoding or "").split(","):
        coding = coding.strip().lower()
        if coding and coding != "identity":
            return coding
    return None


STANDARD_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")


READ, WRITE, ADMIN = "read", "write", "admin"


def key_in_path(sent: bytes) -> str:
    """The key a ``/keys/{key}`` request names, from the bytes after ``/keys/`` as sent.

    They are percent-decoded, then read as UTF-8: a key may arrive escaped
    (``caf%C3%A9``) or as raw UTF-8 (``café``, as curl sends it), and both name
    the same key on every route. Anything else is a 400, never a guess.
    """
    try:
        return unquote_to_bytes(sent).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the key in the path is not UTF-8 (percent-encode its UTF-8 bytes)") from None


def sent_path(request: httputil.HTTPServerRequest) -> bytes:
    """The request's path as the client sent it: Tornado decodes the request line as
    Latin-1, so encoding it back restores every byte."""
    return request.path.encode("latin-1")


def requested_key(request: httputil.HTTPServerRequest) -> str:
    """The key of a ``/keys/{key}`` request Tornado parsed (``key_in_path`` of its path)."""
    return key_in_path(sent_path(request)[len(b"/keys/"):])


def error_body(code: str, message: str) -> bytes:
    """The one shape of every error answer."""
    return orjson.dumps({"error": {"code": code, "message": message}})


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``Date`` header, formatted once a second rather than once a request."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, httputil.format_timestamp(now))
    return _date_cache[1]


class BaseHandler(RequestHandler):
    endpoint = "unmatched"
    """The route template for metrics and logs; never a raw path (keys stay out)."""

    scopes: dict[str, str] = {}
    """The scope each method needs (checked by an ``authenticate`` plugin); absent: open."""

    write_parameters: dict[str, tuple[str, ...]] = {}
    """The query parameters each write method takes; any other is a 400."""

    principal: str | None = None
    """Who is asking, when a plugin knows it; recorded as the actor of writes."""

    past_reads = False
    """Whether GET and HEAD answer ``?at=`` (a past state); elsewhere ``require_ready`` refuses it."""

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        # In flight from now until on_finish (or the client hanging up); the
        # count starts here, when tornado builds the handler, so there is no
        # gap after KvdApplication's own count for the request head and body.
        ctx.in_flight += 1
        self._counted = True

    def compute_etag(self) -> None:
        """No body-hash ETags: a key's ETag is its revision, set by the handler."""
        return None

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Cache-Control", "no-store")

    # --- lifecycle ---------------------------------------------------------

    def prepare(self) -> None:
        if self.ctx.requests_authenticated:
            scope = self.scopes.get(self.request.method or "")
            if scope is not None:
                self.principal = self.ctx.plugins.hook.authenticate(
                    request=self.request, scope=scope, endpoint=self.endpoint
                )

    def on_finish(self) -> None:
        if getattr(self, "_counted", False):
            self.ctx.in_flight -= 1
            self._counted = False
        self.ctx.request_done(
            self.request.method or "", self.endpoint, self.get_status(),
            self.request.request_time(),
        )

    def on_connection_close(self) -> None:
        # A client that hangs up mid-request still ends its in-flight count.
        if getattr(self, "_counted", False):
            self.ctx.in_flight -= 1
            self._counted = False

    # --- helpers -----------------------------------------------------------

    def query(self, name: str) -> str | None:
        """A query parameter decoded strictly as UTF-8, unstripped; 400 on bad bytes."""
        values = self.request.query_arguments.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise BadRequest(f"query parameter {name!r} given more than once")
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"query parameter {name!r} is not valid UTF-8") from None

    def require_ready(self) -> None:
        if not self.store.ready:
            raise Unavailable(self.starting_reason(), headers={"Retry-After": "1"})
        if "at" in self.request.query_arguments and not (
            self.past_reads and self.request.method in ("GET", "HEAD")
        ):
            # Ignoring it would write, or answer with the present, as if it had been honoured.
            raise BadRequest(
                "?at= reads a past state: only GET and HEAD of /keys and /keys/{id} take it"
            )
        self.refuse_unknown_parameters()

    def starting_reason(self) -> str:
        """Why the store does not serve yet: the journal's reason when it has one (NATS
        unreachable, say), which replaying cannot end, else the replay itself."""
        journal = self.ctx.journal
        problem = journal.readiness_problem if journal is not None else None
        return problem or "kvd is replaying its journal"

    def refuse_unknown_parameters(self) -> None:
        """On a write, a query parameter kvd does not know is a 400, never ignored.

        Ignored, a misspelt ``?expires_in=60`` would store a key that never
        expires, and ``DELETE /keys?filter=tmp*`` would delete every key. Reads
        keep ignoring them (a cache-busting ``?_=...`` changes nothing there).
        """
        method = self.request.method or ""
        if method in ("GET", "HEAD"):
            return
        takes = self.write_parameters.get(method, ())
        unknown = sorted(name for name in self.request.query_arguments if name not in takes)
        if unknown:
            raise BadRequest(
                f"unknown query parameter {unknown[0]!r}: {method} {self.endpoint} takes "
                + (", ".join(takes) if takes else "none")
            )

    def send_json(self, body: bytes, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", JSON_TYPE)
        self.finish(body)

    # --- errors ------------------------------------------------------------

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        headers: dict[str, str] = {}
        if isinstance(exc, KvdError):
            code, message, headers = exc.code, exc.message, exc.headers
        elif isinstance(exc, HTTPError):
            code = CODES_BY_STATUS.get(status_code, "bad_request" if status_code < 500 else "internal_error")
            message = exc.log_message or httputil.responses.get(status_code, "error")
            if exc.args:
                message = message % exc.args if "%" in message else message
        else:
            code, message = "internal_error", "internal server error"
            self.ctx.report_error(type(exc).__name__ if exc else "unknown", exc)
        if status_code == 405:
            headers = {"Allow": ", ".join(self.allowed_methods()), **headers}
        for name, value in headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", JSON_TYPE)
        body = error_body(code, message)
        if self.request.method == "HEAD":
            # The length GET would send (RFC 9110 section 8.6), not 0 for the body left out.
            self.set_header("Content-Length", len(body))
            self.finish()
            return
        self.finish(body)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, HTTPError):
            return  # an answered client error, not a fault
        super().log_exception(typ, value, tb)

    def allowed_methods(self) -> list[str]:
        """Methods this handler implements (for ``Allow``)."""
        return [
            method
            for method in STANDARD_METHODS
            if getattr(type(self), method.lower()) is not BaseHandler._unimplemented_method
        ]

    def _unimplemented_method(self, *args: str, **kwargs: str) -> None:
        raise HTTPError(405)

    head = get = post = delete = patch = put = options = _unimplemented_method  # type: ignore[assignment]


class _EveryMethod:
    """Contains every method name, so tornado lets any method reach prepare()."""

    def __contains__(self, method: object) -> bool:
        return True


class NotFoundHandler(BaseHandler):
    """Any path no route matches: a JSON 404 that names a disabled plugin's route."""

    SUPPORTED_METHODS = _EveryMethod()  # type: ignore[assignment]

    plugin_routes = {"/metrics": "metrics"}

    def prepare(self) -> None:
        super().prepare()
        path = unquote_to_bytes(sent_path(self.request)).decode("utf-8", "replace")
        plugin = self.plugin_routes.get(path)
        if plugin is not None:
            raise NotFound(f"{path} needs the '{plugin}' plugin; enable it in [plugins] enabled")
        raise NotFound(f"no route for {self.request.method} {path}")
