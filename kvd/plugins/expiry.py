"""The built-in ``expiry`` plugin: ``?expire_in=`` and the active sweep.

Expiry times are absolute in the journal, so a restart never extends a key's
life, and the store hides an expired key everywhere from that instant. This
plugin turns ``expire_in`` into that absolute time and removes expired keys
in the background by journaling op ``expire`` records, so replay and audit
never depend on the clock.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from kvd import hookimpl
from kvd.app import AppContext, PeriodicTask
from kvd.config import positive_int, positive_number
from kvd.errors import BadRequest, Unavailable
from kvd.log.format import OP_EXPIRE
from kvd.model import Change

MAX_EXPIRE_IN = 315_360_000  # ten 365-day years, in seconds
MAX_SWEEP_INTERVAL = 60.0
_DECIMAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class ExpiryPlugin:
    def __init__(self, sweep_interval: float = 0.1, sweep_batch: int = 1000) -> None:
        self.sweep_interval = positive_number(
            sweep_interval, "plugins.expiry.sweep_interval", unit="seconds", at_most=MAX_SWEEP_INTERVAL
        )
        self.sweep_batch = positive_int(sweep_batch, "plugins.expiry.sweep_batch")
        self.expired = Counter(
            "kvd_expired_keys", "Keys removed because their expiry passed", registry=None
        )
        self.lag = Histogram(
            "kvd_expiry_lag_seconds",
            "How late expired keys were removed (journaled) after their expiry time",
            buckets=LAG_BUCKETS,
            registry=None,
        )

    @hookimpl
    def resolve_expiry(self, expire_in: str, now: float) -> float:
        # float() alone would also take "1_000", " 1 " and non-ASCII digits.
        if not _DECIMAL.fullmatch(expire_in):
            raise BadRequest(
                f"expire_in must be a positive decimal number of seconds (30, 1.5, 1e3), not {expire_in!r}"
            )
        try:
            # Compared exactly: as a float, 315360000.0000000001 rounds down to the limit.
            exact: Decimal | None = Decimal(expire_in)
        except InvalidOperation:  # an exponent beyond what a Decimal holds (1e99999999999999999999)
            exact = None
        if exact is None or not 0 < exact <= MAX_EXPIRE_IN:
            raise BadRequest(
                f"expire_in must be a positive number of seconds up to {MAX_EXPIRE_IN}"
            )
        return now + float(exact)

    @hookimpl
    def periodic_tasks(self, ctx: AppContext) -> list[PeriodicTask]:
        return [PeriodicTask("expiry_sweep", self.sweep_interval, lambda: self.sweep(ctx))]

    @hookimpl
    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(self.expired)
        registry.register(self.lag)

    async def sweep(self, ctx: AppContext) -> int:
        """Journal the removal of every key whose expiry has passed; returns how many."""
        store = ctx.store
        removed = 0
        while True:
            keys = store.take_expired(self.sweep_batch)
            if not keys:
                return removed
            due = [store.current_raw(key).expires_at for key in keys]  # type: ignore[union-attr]

            def prepare(keys: list[str] = keys) -> Change:
                # Run again when another node's record came first (it may
                # have removed some of these keys already).
                now = store.clock()
                left = tuple(
                    key for key in keys
                    if (entry := store.current_raw(key)) is not None and entry.expired(now)
                )
                if not left:
                    raise _NothingLeft
                return Change(op=OP_EXPIRE, keys=left)

            try:
                await store.write(prepare)
            except _NothingLeft:
                continue
            except Unavailable:
                store.return_expired(keys)
                return removed
            now = store.clock()
            for expires_at in due:
                self.lag.observe(max(0.0, now - expires_at))  # type: ignore[operator]
            self.expired.inc(len(keys))
            removed += len(keys)


class _NothingLeft(Exception):
    """Every key of a sweep batch was removed by another node's record first."""


def make_plugin(settings: dict[str, Any]) -> ExpiryPlugin:
    unknown = set(settings) - {"sweep_interval", "sweep_batch"}
    if unknown:
        raise ValueError(f"unknown setting plugins.expiry.{sorted(unknown)[0]}")
    return ExpiryPlugin(**settings)
