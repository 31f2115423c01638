"""Operator actions over HTTP: ``POST /journal/compact`` (like Redis's BGREWRITEAOF).

Compaction also runs by itself when the journal outgrows the live data; this
route lets an operator (or a benchmark) run one now and see its report.
"""

from __future__ import annotations

import dataclasses
import logging

import orjson

from kvd.errors import NotFound, Unavailable
from kvd.handlers.base import ADMIN, BaseHandler
from kvd.log.compaction import CompactionFailed

log = logging.getLogger("kvd.journal")


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
        try:
            report = await compactor.compact()
        except CompactionFailed as exc:
            # Still counted in internal_error_count under the label a bare 500 had, so
            # alerts keep working; the operator is told what failed and that the store
            # is as it was. No Retry-After: what killed the writer may well do it again.
            log.error("compaction failed: %s", exc)
            self.ctx.report_error("CompactionFailed", exc)
            raise Unavailable(f"compaction failed: {exc}; nothing was retired") from exc
        self.send_json(orjson.dumps(dataclasses.asdict(report)))
