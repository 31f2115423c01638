"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class FakeClock:
    """A clock tests move by hand: ``clock.now += 10``."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Ran:
    """What a ``kvd`` command run in-process gave: exit status, stdout, stderr."""

    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines()]
