"""Small value types shared by the store, the journal and the plugins."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class Entry:
    """A live key's state: its value as compact JSON bytes, revision and expiry."""

    value: bytes
    revision: int
    expires_at: float | None = None  # epoch seconds; None never expires

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(slots=True)
class Change:
    """A write a client asks for, before it is journaled.

    Plugins see it in ``validate_write`` and may reject it by raising a
    ``kvd.errors.KvdError``. ``set`` holds JSON-encoded values; ``expires``
    absolute expiry times (epoch seconds) for some of the keys in ``set``;
    ``keys`` the keys a delete removes. ``actor`` is the acting principal
    when a plugin knows it.
    """

    op: str
    set: dict[str, bytes] = field(default_factory=dict)
    expires: dict[str, float] = field(default_factory=dict)
    keys: tuple[str, ...] = ()
    actor: str | None = None
    client: str | None = None  # the client's address, when ``journal.record_client`` is on

    def touched_keys(self) -> tuple[str, ...]:
        return tuple(self.set) if self.set else self.keys


class KeyFilter(Protocol):
    """A compiled key pattern, as returned by the ``compile_filter`` hook."""

    prefix: str
    """Every matching key starts with this (may be empty): listings scan only that range."""

    # Optional: ``prefix_only`` True says every key starting with ``prefix``
    # matches, so listings skip ``match`` (read with getattr, default False).

    def match(self, key: str) -> bool:
        """Whether the whole key matches."""
        ...


def match_of(key_filter: KeyFilter | None) -> Callable[[str], bool] | None:
    """The per-key test a listing must apply within the filter's prefix range (None: none)."""
    if key_filter is None or getattr(key_filter, "prefix_only", False):
        return None
    return key_filter.match
