"""The URL table: core routes first, so no plugin can shadow ``/keys``."""

from __future__ import annotations

import logging

from tornado.web import Application, RequestHandler

from kvd.app import AppContext, Route
from kvd.handlers.base import NotFoundHandler
from kvd.handlers.health import HealthHandler, ReadyHandler
from kvd.handlers.keys import KeyHandler, KeysHandler
from kvd.handlers.openapi import OpenAPIHandler


def core_routes(ctx: AppContext) -> list[Route]:
    shared = {"ctx": ctx}
    return [
        (r"/keys", KeysHandler, shared),
        (r"/keys/(.+)", KeyHandler, shared),
        (r"/healthz", HealthHandler, shared),
        (r"/readyz", ReadyHandler, shared),
        (r"/openapi\.json", OpenAPIHandler, shared),
    ]


def make_app(ctx: AppContext) -> Application:
    routes = core_routes(ctx)
    for plugin_routes in ctx.plugins.hook.register_routes(ctx=ctx):
        routes.extend(plugin_routes or ())
    return Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        log_function=_log_request,
        compress_response=False,
    )


access_log = logging.getLogger("kvd.access")


def _log_request(handler: RequestHandler) -> None:
    """Access log: method, route template and status; never the raw path (keys may be secret)."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(
            "%s %s %d %.1fms",
            handler.request.method,
            getattr(handler, "endpoint", "unmatched"),
            handler.get_status(),
            1000.0 * handler.request.request_time(),
        )
