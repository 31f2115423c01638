"""Plugins used by the tests, loaded by dotted path like any third-party plugin."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter
from tornado.web import RequestHandler

from kvd import HIDDEN, hookimpl
from kvd.app import PeriodicTask
from kvd.errors import Forbidden


class EchoHandler(RequestHandler):
    def initialize(self, text: str) -> None:
        self.text = text

    def get(self) -> None:
        self.finish({"echo": self.text})


class Recorder:
    """Implements every hook and records each call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self.ticks = 0

    @classmethod
    def make_plugin(cls, settings: dict[str, Any]) -> Recorder:
        return cls()

    def _note(self, hook: str, **arguments: Any) -> None:
        self.calls.setdefault(hook, []).append(arguments)

    @hookimpl
    def register_routes(self, ctx: Any) -> list[Any]:
        self._note("register_routes")
        return [(r"/recorder", EchoHandler, {"text": "hi"}), (r"/keys", EchoHandler, {"text": "shadow"})]

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self._note("register_metrics")
        Counter("recorder_things", "Things the recorder saw", registry=registry).inc(3)

    @hookimpl
    def periodic_tasks(self, ctx: Any) -> list[PeriodicTask]:
        def tick() -> None:
            self.ticks += 1

        return [PeriodicTask("recorder_tick", 0.01, tick)]

    @hookimpl
    def startup(self, ctx: Any) -> None:
        self._note("startup", ready=ctx.store.ready)

    @hookimpl
    def shutdown(self, ctx: Any) -> None:
        self._note("shutdown")

    @hookimpl
    def validate_write(self, change: Any) -> None:
        self._note("validate_write", op=change.op)
        if "forbidden" in change.touched_keys():
            raise Forbidden("the recorder forbids 'forbidden'")

    @hookimpl
    def transform_read(self, key: str, value: bytes) -> Any:
        if key == "secret":
            return HIDDEN
        if key == "shout":
            return value.upper()
        return None

    @hookimpl
    def request_finished(self, method: str, endpoint: str, status: int) -> None:
        self._note("request_finished", method=method, endpoint=endpoint, status=status)

    @hookimpl
    def after_commit(self, record: Any) -> None:
        self._note("after_commit", seq=record.seq, op=record.op)

    @hookimpl
    def journal_synced(self, records: int) -> None:
        self._note("journal_synced", records=records)

    @hookimpl
    def internal_error(self, error: str) -> None:
        self._note("internal_error", error=error)

    @hookimpl
    def check_routes(self, endpoints: Any) -> None:
        self._note("check_routes", endpoints=endpoints)


class FailingObserver:
    """An after_commit observer and a periodic task that always raise."""

    @hookimpl
    def after_commit(self, record: Any) -> None:
        raise RuntimeError("observer is broken")

    @hookimpl
    def periodic_tasks(self, ctx: Any) -> list[PeriodicTask]:
        def explode() -> None:
            raise RuntimeError("task is broken")

        return [PeriodicTask("explode", 0.01, explode)]


class ExpiryAnswer:
    """A third-party answer to resolve_expiry: fixed 1000 s, overriding nothing else."""

    @hookimpl(tryfirst=True)
    def resolve_expiry(self, expire_in: str, now: float) -> float | None:
        return now + 1000 if expire_in == "fixed" else None


class HeaderAuth:
    """Trusts an ``X-Who`` header: enough to test the authenticate hook's contract."""

    @hookimpl
    def authenticate(self, request: Any, scope: str, endpoint: str) -> str | None:
        from kvd.errors import Unauthorized

        who = request.headers.get("X-Who")
        if who is None:
            raise Unauthorized(f"{endpoint} needs {scope}")
        if who == "reader" and scope != "read":
            raise Forbidden(f"reader may not {scope}")
        return who


class ScopedRoute:
    """Adds ``GET /scoped``, which needs ``read``: a plugin route the auth plugin protects."""

    @hookimpl
    def register_routes(self, ctx: Any) -> list[Any]:
        from kvd.handlers.base import READ, BaseHandler

        class ScopedHandler(BaseHandler):
            endpoint = "/scoped"
            scopes = {"GET": READ}

            def get(self) -> None:
                self.finish({"scoped": True})

        return [(r"/scoped", ScopedHandler, {"ctx": ctx})]


class RouteRefuser:
    """Refuses every route table, in words that do not name a setting."""

    @hookimpl
    def check_routes(self, endpoints: Any) -> None:
        raise ValueError("needs a /reports route")
