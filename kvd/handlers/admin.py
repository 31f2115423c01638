"""Operator actions over HTTP: ``POST /journal/compact`` (like Redis's BGREWRITEAOF).

Compaction also runs by itself when the journal outgrows the live data; this
route lets an operator (or a benchmark) run one now and see its report.
"""

from __future__ import annotations

import dataclasses

import orjson

from kvd.errors import NotFound, Unavailable
from kvd.handlers.base import ADMIN, BaseHandler


class CompactHandler(BaseHandler):
    endpoint = "/journal/compact"
    scopes = {"POST": ADMIN}

    async def post(self) -> None:
        self.require_ready()
        compactor = self.ctx.compactor
        if compactor is None:
            raise NotFound("this journal backend does not compact")
        if compactor.running:
            raise Unavailable("a compaction is already running", headers={"Retry-After": "1"})
        if not self.ctx.journal.writable:
            raise Unavailable("the journal refuses writes until restart")
        report = await compactor.compact()
        self.send_json(orjson.dumps(dataclasses.asdict(report)))
