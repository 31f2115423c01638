"""The built-in ``metrics`` plugin: Prometheus text at ``/metrics``.

Each app gets its own CollectorRegistry (tests stay isolated). Request
metrics are labelled by route template, never by key. Store-wide numbers are
read at scrape time by a collector, so the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from kvd import hookimpl
from kvd.app import AppContext, Route
from kvd.handlers.base import ADMIN, STANDARD_METHODS, BaseHandler

FSYNC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
OTHER_METHOD = "other"  # the method label of any request whose method is not a standard one


class MetricsPlugin:
    def __init__(self) -> None:
        disable_created_metrics()  # *_created series double the scrape for no use here
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "request_count", "HTTP requests answered",
            ["method", "endpoint", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "request_latency_seconds", "Time to answer an HTTP request",
            ["method", "endpoint"], registry=self.registry,
        )
        self.errors = Counter(
            "internal_error_count", "Unexpected errors caught inside kvd",
            ["error"], registry=self.registry,
        )
        self.fsync = Histogram(
            "kvd_fsync_seconds", "Duration of journal fsyncs",
            buckets=FSYNC_BUCKETS, registry=self.registry,
        )
        self.batch = Histogram(
            "kvd_commit_batch_records", "Records made durable by one journal write and fsync",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        # labels() costs a dict build and lock per call; keep the children.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    @hookimpl
    def register_routes(self, ctx: AppContext) -> list[Route]:
        # Registered with the route, not at startup: /metrics answers during replay,
        # and an alert on kvd_ready == 0 needs the series then.
        self.registry.register(StoreCollector(ctx))
        handler_kwargs = {"ctx": ctx, "registry": self.registry, "before_scrape": self.show_known_errors}
        return [(r"/metrics", MetricsHandler, handler_kwargs)]

    @hookimpl
    def startup(self, ctx: AppContext) -> None:
        ctx.plugins.hook.register_metrics(ctx=ctx, registry=self.registry)

    @hookimpl
    def request_finished(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        children = self._request_children.get((method, endpoint, status))
        if children is None:
            children = self._children(method, endpoint, status)
        children[0].inc()
        children[1].observe(seconds)

    def _children(self, method: str, endpoint: str, status: int) -> tuple[Any, Any]:
        """The series for these labels, made once. A client picks the method (BREW, any
        token): as a label it would grow the series, and this cache, without bound, so
        another than a standard method is labelled (and kept) as 'other'."""
        if method not in STANDARD_METHODS:
            method = OTHER_METHOD
        children = self._request_children.get((method, endpoint, status))
        if children is None:
            children = (
                self.requests.labels(method, endpoint, str(status)),
                self.latency.labels(method, endpoint),
            )
            self._request_children[(method, endpoint, status)] = children
        return children

    def show_known_errors(self, ctx: AppContext) -> None:
        """Make the internal_error_count series of every label known so far, at 0 until
        counted, so a healthy server reports 0 rather than no data. Done at each scrape:
        the periodic tasks (task_<name>) start after the startup hook."""
        for label in ctx.error_labels():
            self.errors.labels(label)  # the child, made once; later calls find it

    @hookimpl
    def internal_error(self, error: str) -> None:
        self.errors.labels(error).inc()

    @hookimpl
    def journal_synced(self, seconds: float, records: int) -> None:
        self.fsync.observe(seconds)
        if records:
            self.batch.observe(records)


class StoreCollector(Collector):
    """Store and journal figures, computed when Prometheus scrapes."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        store, journal = self.ctx.store, self.ctx.journal
        yield GaugeMetricFamily("kvd_ready", "1 when serving, 0 while replaying", value=int(store.ready))
        if not store.ready:  # replay is filling the store in another thread: nothing to report yet
            return
        yield GaugeMetricFamily("kvd_keys", "Live keys (expired keys not yet swept included)", value=len(store))
        yield GaugeMetricFamily("kvd_live_bytes", "Bytes of live keys and values", value=store.live_bytes)
        if journal is not None:
            stats = journal.stats
            yield GaugeMetricFamily("kvd_revision", "Sequence number of the last durable record", value=journal.last_seq)
            yield GaugeMetricFamily("kvd_journal_bytes", "Bytes in journal segment and snapshot files", value=stats.bytes)
            yield GaugeMetricFamily("kvd_journal_segments", "Journal segment files", value=stats.segments)
            yield GaugeMetricFamily("kvd_journal_records", "Records replayed or written since start", value=stats.records)
            yield GaugeMetricFamily("kvd_replay_seconds", "Seconds the start-up replay took", value=stats.replay_seconds)
            yield GaugeMetricFamily("kvd_writable", "1 while the journal takes writes", value=int(journal.writable))
            yield CounterMetricFamily("kvd_compactions", "Compactions completed since start", value=stats.compactions)
            yield GaugeMetricFamily(
                "kvd_compaction_seconds", "Duration of the last compaction", value=stats.compaction_seconds
            )
            for name, (kind, about, value) in journal.extra_metrics().items():
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, about, value=value)


class MetricsHandler(BaseHandler):
    endpoint = "/metrics"
    scopes = {"GET": ADMIN, "HEAD": ADMIN}

    def initialize(  # type: ignore[override]
        self, ctx: AppContext, registry: CollectorRegistry, before_scrape: Callable[[AppContext], None]
    ) -> None:
        super().initialize(ctx)
        self.registry = registry
        self.before_scrape = before_scrape

    def get(self) -> None:
        self.before_scrape(self.ctx)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.registry))

    head = get  # RFC 9110: wherever GET is; Tornado leaves the body out


def make_plugin(settings: dict[str, Any]) -> MetricsPlugin:
    if settings:
        raise ValueError(f"unknown setting plugins.metrics.{sorted(settings)[0]}")
    return MetricsPlugin()
