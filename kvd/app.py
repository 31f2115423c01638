"""What every handler and plugin shares for one running store: the AppContext.

It wires plugins to the store (commit observers, periodic tasks) so that a
failing plugin is counted and contained instead of reaching the data.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy
from tornado.ioloop import PeriodicCallback

from kvd.config import Config
from kvd.log.format import Record
from kvd.log.journal import Journal
from kvd.store import Store

log = logging.getLogger("kvd.app")
access_log = logging.getLogger("kvd.access")

Route = tuple[str, type, dict[str, Any]]

ERROR_LABELS = (
    "hook_request_finished",
    "hook_journal_synced",
    "stream_end",
    "feed_history_short",
    "feed_observer",
    "CompactionFailed",
)
"""Every fixed label kvd passes to ``report_error``, so the metrics plugin can show each
at 0 from start-up. The others are ``plugin_<name>`` and ``task_<name>`` (see
``AppContext.error_labels``) and the class name of an exception a handler did not
expect, which cannot be known in advance. A test checks the callers against this.
"""


@dataclass(frozen=True)
class PeriodicTask:
    """Background work a plugin runs every ``interval`` seconds, never overlapping itself."""

    name: str
    interval: float
    callback: Callable[[], Awaitable[None] | None]


@dataclass
class AppContext:
    config: Config
    store: Store
    plugins: pluggy.PluginManager
    journal: Journal | None = None
    started_at: float = field(default_factory=time.time)
    compactor: Any = None  # kvd.log.compaction.Compactor for a file journal
    in_flight: int = 0
    streams: set[Callable[[], None]] = field(default_factory=set)
    """How to end each open ``GET /journal?follow=1`` stream; called when the server stops."""
    _periodic: list[PeriodicCallback] = field(default_factory=list)
    _task_names: list[str] = field(default_factory=list)
    """Every periodic task started, kept after they stop: their error labels stay known."""

    def __post_init__(self) -> None:
        hook = self.plugins.hook
        # Hot-path hooks are looked up once: a hook nobody implements costs nothing.
        self.reads_transformed = bool(hook.transform_read.get_hookimpls())
        self.writes_validated = bool(hook.validate_write.get_hookimpls())
        self.requests_observed = bool(hook.request_finished.get_hookimpls())
        self.requests_authenticated = bool(hook.authenticate.get_hookimpls())
        # pluggy calls the last registered first (tryfirst/trylast reorder it).
        self._commit_observers = hook.after_commit.get_hookimpls()[::-1]
        if self._commit_observers:
            self.store.observers.append(self._observe_commit)

    def request_done(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """After every response, from either request path: access log and plugins."""
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s %s %d %.1fms", method, endpoint, status, 1000.0 * seconds)
        if not self.requests_observed:
            return
        try:
            self.plugins.hook.request_finished(
                method=method, endpoint=endpoint, status=status, seconds=seconds
            )
        except Exception as exc:
            log.exception("request_finished hook failed")
            self.report_error("hook_request_finished", exc)

    @property
    def plain_reads(self) -> bool:
        """Whether a GET of a key is only a lookup (no plugin authenticates or rewrites reads)."""
        return not (self.requests_authenticated or self.reads_transformed)

    def report_error(self, label: str, exc: BaseException | None = None) -> None:
        """Count an unexpected error in ``internal_error_count`` (via the hook)."""
        try:
            self.plugins.hook.internal_error(error=label, exc=exc)
        except Exception:  # noqa: BLE001 - reporting must never raise
            log.exception("internal_error hook failed")

    def error_labels(self) -> list[str]:
        """The ``report_error`` labels known so far: the fixed ones, one per
        ``after_commit`` implementation and one per periodic task started."""
        plugins = [f"plugin_{impl.plugin_name}" for impl in self._commit_observers]
        tasks = [f"task_{name}" for name in self._task_names]
        return [*ERROR_LABELS, *plugins, *tasks]

    def _observe_commit(self, record: Record) -> None:
        """Run each after_commit implementation alone, so one failure skips only itself."""
        for impl in self._commit_observers:
            arguments = {"ctx": self, "record": record}
            try:
                impl.function(**{name: arguments[name] for name in impl.argnames})
            except Exception as exc:
                log.exception("after_commit hook of plugin %r failed", impl.plugin_name)
                self.report_error(f"plugin_{impl.plugin_name}", exc)

    def start_periodic_tasks(self) -> None:
        for tasks in self.plugins.hook.periodic_tasks(ctx=self):
            for task in tasks or ():
                self.add_periodic_task(task)

    def add_periodic_task(self, task: PeriodicTask) -> None:
        callback = PeriodicCallback(self._guarded(task), task.interval * 1000)
        callback.start()
        self._periodic.append(callback)
        if task.name not in self._task_names:
            self._task_names.append(task.name)

    def stop_periodic_tasks(self) -> None:
        for callback in self._periodic:
            callback.stop()
        self._periodic.clear()

    def end_streams(self) -> None:
        """The server is stopping: end every open ``GET /journal?follow=1`` stream.

        A follower never finishes by itself, so it does not count as in
        flight (the drain does not wait for it); it is ended here, with a last
        line saying why, before the server closes the connections.
        """
        for end in list(self.streams):
            try:
                end()
            except Exception as exc:
                log.exception("ending a journal stream failed")
                self.report_error("stream_end", exc)
        self.streams.clear()

    def _guarded(self, task: PeriodicTask) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                result = task.callback()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.exception("periodic task %r failed", task.name)
                self.report_error(f"task_{task.name}", exc)

        return run
