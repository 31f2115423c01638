"""Every hook a kvd plugin can implement, grouped by when it runs.

A plugin writes ``from kvd import hookimpl`` and implements any of these with
the same argument names (it may take fewer). Hooks are always called with
keyword arguments. Hot-path hooks (per request, per record) are synchronous
and must be cheap. ``docs/plugins.md`` documents each one; a test keeps the
two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from tornado.httputil import HTTPServerRequest

    from kvd.app import AppContext, PeriodicTask, Route
    from kvd.log.format import Record
    from kvd.model import Change, KeyFilter

PROJECT = "kvd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- lifecycle -------------------------------------------------------------


@hookspec
def register_routes(ctx: AppContext) -> list[Route]:
    """Called once while the app is built: extra routes this plugin serves.

    Return a list of ``(pattern, HandlerClass, kwargs)`` tuples. Core routes
    come first, so a plugin cannot shadow ``/keys``.
    """


@hookspec
def check_routes(endpoints: Mapping[str, Mapping[str, str]]) -> None:
    """Called once while the app is built, after every ``register_routes``: check settings that name routes.

    ``endpoints`` maps each route template the app serves (``/keys/{id}``,
    and a plugin's only while it is enabled, such as ``/metrics``) to the
    scope each of its methods needs (``{"GET": "admin"}``; empty: always
    open). Do not change it. Return nothing; raise ``ValueError`` naming the
    setting to stop start-up (``kvd serve`` exits 2 before it locks the data
    directory or listens).
    """


@hookspec
def register_metrics(ctx: AppContext, registry: CollectorRegistry) -> None:
    """Called once by the metrics plugin: add collectors to the app's registry.

    Only called when the ``metrics`` plugin is enabled.
    """


@hookspec
def periodic_tasks(ctx: AppContext) -> list[PeriodicTask]:
    """Called once after replay: background work to run while serving.

    Return ``PeriodicTask(name, interval_seconds, callback)`` items; each runs
    on the IOLoop, never overlapping itself. A task that raises is counted in
    ``internal_error_count`` and runs again at its next tick.
    """


@hookspec
def startup(ctx: AppContext) -> None:
    """Called once when replay is done and the store serves, before periodic tasks start."""


@hookspec
def shutdown(ctx: AppContext) -> None:
    """Called once on SIGTERM/SIGINT after requests drained, before the journal closes."""


# --- requests --------------------------------------------------------------


@hookspec(firstresult=True)
def authenticate(request: HTTPServerRequest, scope: str, endpoint: str) -> str | None:
    """Called before each request to a route that needs a scope: who asks, and may they.

    ``scope`` is what the route needs by default (``read``, ``write`` or
    ``admin``); ``endpoint`` is its route template. Return the principal's
    name (recorded as the journal's ``actor`` of the writes it makes), or None
    for no opinion. Raise ``kvd.errors.Unauthorized`` (401) or
    ``kvd.errors.Forbidden`` (403) to refuse. Stops at the first non-None result.
    """



@hookspec(firstresult=True)
def resolve_expiry(expire_in: str, now: float) -> float | None:
    """Called for a write with ``?expire_in=``: the absolute expiry (epoch seconds).

    Stops at the first non-None result. Raise ``kvd.errors.BadRequest`` for a
    bad value. When no plugin answers, the request fails with 400 naming the
    ``expiry`` plugin.
    """


@hookspec(firstresult=True)
def compile_filter(pattern: str) -> KeyFilter | None:
    """Called for a listing with ``?filter=``: a compiled ``KeyFilter``.

    Stops at the first non-None result. Raise ``kvd.errors.BadRequest`` for a
    bad pattern. When no plugin answers, the request fails with 400 naming
    the ``filter`` plugin.
    """


@hookspec
def validate_write(ctx: AppContext, change: Change) -> None:
    """Called before a write is journaled; raise a ``KvdError`` to reject it.

    Runs after the core's own checks. Every implementation runs; the first to
    raise decides the answer and nothing is written.
    """


@hookspec(firstresult=True)
def transform_read(key: str, value: bytes) -> bytes | None:
    """Called for each key a read or listing returns, when any plugin implements it.

    Return replacement JSON bytes, ``kvd.HIDDEN`` to hide the key (404 on a
    single read, omitted from listings), or None to leave it as stored.
    Stops at the first non-None result.
    """


@hookspec
def request_finished(method: str, endpoint: str, status: int, seconds: float) -> None:
    """Called after every response. ``endpoint`` is the route template, never a raw path."""


# --- journal ---------------------------------------------------------------


@hookspec
def after_commit(ctx: AppContext, record: Record) -> None:
    """Called for each record once it is durable and applied; it cannot undo it.

    Observers that raise are counted in ``internal_error_count`` and skipped;
    the write still succeeds.
    """


@hookspec
def journal_synced(seconds: float, records: int, nbytes: int) -> None:
    """Called after each journal write batch is made durable (one write + fsync)."""


@hookspec
def internal_error(error: str, exc: BaseException | None) -> None:
    """Called when kvd catches an unexpected error; ``error`` is a short class label."""


def all_hook_names() -> list[str]:
    """Names of every hook spec, for docs and tests."""
    return sorted(
        name
        for name, value in globals().items()
        if callable(value) and hasattr(value, f"{PROJECT}_spec")
    )

