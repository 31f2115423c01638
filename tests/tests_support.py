"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations


class FakeClock:
    """A clock tests move by hand: ``clock.now += 10``."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
