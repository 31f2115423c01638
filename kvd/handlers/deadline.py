"""``server.body_timeout``: a request body must arrive in full within it, or the connection closes.

Tornado has the same setting, but it waits for every body through
``gen.with_timeout``, which wraps the read in a task and chains futures: three
extra event-loop passes per request with a body. Under load one pass is a round
of every other connection's I/O (10-20 ms at 64 connections), so a PUT waited
tens of milliseconds before kvd even saw it. A timer per request costs no pass.
"""

from __future__ import annotations

import logging
from typing import Any

from tornado import httputil
from tornado.ioloop import IOLoop

log = logging.getLogger("kvd.server")


def has_body(request: httputil.HTTPServerRequest) -> bool:
    """Whether the request announces a body (a length above 0, or chunks)."""
    headers = request.headers
    return headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in headers


class BodyDeadline(httputil.HTTPMessageDelegate):
    """Passes everything on to ``inner``; closes the connection if the body is late."""

    def __init__(
        self, inner: httputil.HTTPMessageDelegate, request: httputil.HTTPServerRequest, timeout: float
    ) -> None:
        self.inner = inner
        self.request = request
        self.timer = IOLoop.current().call_later(timeout, self._expire)

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        IOLoop.current().remove_timeout(self.timer)
        self.inner.finish()

    def on_connection_close(self) -> None:
        IOLoop.current().remove_timeout(self.timer)
        self.inner.on_connection_close()

    def _expire(self) -> None:
        log.info("timeout reading a request body from %s", self.request.remote_ip)
        connection = self.request.connection
        if connection is not None:
            connection.close()  # type: ignore[attr-defined]  # an HTTP1Connection
