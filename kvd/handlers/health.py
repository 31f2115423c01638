"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import orjson

from kvd.errors import Unavailable
from kvd.handlers.base import BaseHandler


class HealthHandler(BaseHandler):
    """``/healthz``: the process is up (always open, even to unauthenticated callers)."""

    endpoint = "/healthz"

    def get(self) -> None:
        self.send_json(b'{"status":"ok"}')

    head = get  # Tornado leaves the body out; some load balancers check with HEAD


class ReadyHandler(BaseHandler):
    """``/readyz``: 200 once replay is done and while the journal takes writes."""

    endpoint = "/readyz"

    def get(self) -> None:
        if not self.store.ready:
            raise Unavailable(self.starting_reason(), headers={"Retry-After": "1"})
        journal = self.ctx.journal
        problem = journal.readiness_problem if journal is not None else None
        if problem is not None:
            raise Unavailable(problem)
        self.send_json(orjson.dumps({"status": "ready", "revision": journal.last_seq if journal else 0}))

    head = get
