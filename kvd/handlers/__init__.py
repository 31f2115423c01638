"""The URL table: core routes first, so no plugin can shadow ``/keys``."""

from __future__ import annotations

import asyncio
from typing import Any

from tornado import httputil
from tornado.web import Application

from kvd.app import AppContext, Route
from kvd.handlers.admin import CompactHandler
from kvd.handlers.base import NotFoundHandler
from kvd.handlers.deadline import BodyDeadline, has_body
from kvd.handlers.fast import FastKeyRead, FastKeyWrite, is_plain_key_read, is_plain_key_write
from kvd.handlers.feed import FeedHandler
from kvd.handlers.framing import BodyTooLarge, ChunkedBodyLimit, declares_too_large_body
from kvd.handlers.health import HealthHandler, ReadyHandler
from kvd.handlers.keys import KeyHandler, KeysHandler
from kvd.handlers.openapi import OpenAPIHandler
from kvd.plugins import check_routes


def core_routes(ctx: AppContext) -> list[Route]:
    shared = {"ctx": ctx}
    return [
        (r"/keys", KeysHandler, shared),
        (r"/keys/(.*)", KeyHandler, shared),  # /keys/ too: an empty key is a 400, not an unknown route
        (r"/healthz", HealthHandler, shared),
        (r"/readyz", ReadyHandler, shared),
        (r"/journal", FeedHandler, shared),
        (r"/journal/compact", CompactHandler, shared),
        (r"/openapi\.json", OpenAPIHandler, shared),
    ]


def endpoint_scopes(routes: list[Route]) -> dict[str, dict[str, str]]:
    """Each route's template (a handler's ``endpoint``, else its pattern) -> method -> scope.

    The first route of a template wins, as Tornado's first match does.
    """
    endpoints: dict[str, dict[str, str]] = {}
    for pattern, handler, _ in routes:
        endpoints.setdefault(getattr(handler, "endpoint", pattern), dict(getattr(handler, "scopes", {})))
    return endpoints


class KvdApplication(Application):
    """The URL table, plus the fast path for plain key reads (see ``kvd.handlers.fast``)."""

    def __init__(self, ctx: AppContext, routes: list[Route], **settings: Any) -> None:
        super().__init__(routes, **settings)
        self.ctx = ctx
        self.fast_paths = True  # tests turn it off to compare both paths
        self.writes: set[asyncio.Future[None]] = set()  # fast-path writes awaiting the journal

    def find_handler(self, request: httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        delegate = self._pick(request)
        if "Transfer-Encoding" in request.headers:
            delegate = ChunkedBodyLimit(self.ctx, delegate, request)
        if has_body(request):
            return BodyDeadline(delegate, request, self.ctx.config.server.body_timeout)
        return delegate

    def _pick(self, request: httputil.HTTPServerRequest) -> Any:
        if declares_too_large_body(self.ctx, request):  # first: tornado itself sets no limit
            return BodyTooLarge(self, request)
        if self.fast_paths and is_plain_key_read(self.ctx, request):
            return FastKeyRead(self, request)
        if self.fast_paths and is_plain_key_write(self.ctx, request):
            return InFlight(self.ctx, FastKeyWrite(self, request))  # in flight while its body comes
        return self.route(request)

    def route(self, request: httputil.HTTPServerRequest) -> httputil.HTTPMessageDelegate:
        """The URL table's handler for a request (what the fast paths fall back to)."""
        return InFlight(self.ctx, super().find_handler(request))


class InFlight(httputil.HTTPMessageDelegate):
    """Counts a request in ``ctx.in_flight`` while its head and body arrive.

    SIGTERM waits for in-flight requests; an upload still arriving is one.
    The handler counts itself from the moment tornado builds it (in
    ``finish``), so the two counts overlap and never leave a gap.
    """

    def __init__(self, ctx: AppContext, inner: httputil.HTTPMessageDelegate) -> None:
        self.ctx = ctx
        self.inner = inner
        self.counted = True
        ctx.in_flight += 1

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()
        self._uncount()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()
        self._uncount()

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.ctx.in_flight -= 1


def make_app(ctx: AppContext) -> KvdApplication:
    """The app for ``ctx``; raises ConfigError when a plugin's ``check_routes`` refuses the table."""
    routes = core_routes(ctx)
    for plugin_routes in ctx.plugins.hook.register_routes(ctx=ctx):
        routes.extend(plugin_routes or ())
    check_routes(ctx.plugins, endpoint_scopes(routes))
    return KvdApplication(
        ctx,
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        log_function=lambda handler: None,  # handlers log through AppContext.request_done
        compress_response=False,
    )
