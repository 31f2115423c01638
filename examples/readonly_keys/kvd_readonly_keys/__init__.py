"""An example third-party kvd plugin: refuse writes to keys matching patterns.

Enable it by dotted path or, once installed, by its entry point name:

    [plugins]
    enabled = ["expiry", "metrics", "filter", "readonly"]

    [plugins.readonly]
    patterns = ["config/*", "locked"]

Writes (puts, deletes, clears) touching a matching key answer 403.
"""

from __future__ import annotations

from typing import Any

from kvd import hookimpl
from kvd.errors import Forbidden
from kvd.plugins.filter import compile_pattern


class ReadonlyKeys:
    def __init__(self, patterns: list[str]) -> None:
        self.patterns = [compile_pattern(pattern) for pattern in patterns]

    def is_locked(self, key: str) -> bool:
        return any(pattern.match(key) for pattern in self.patterns)

    @hookimpl
    def validate_write(self, ctx: Any, change: Any) -> None:
        if change.op == "clear":
            if any(self._any_locked_key(ctx)):
                raise Forbidden("DELETE /keys would remove read-only keys")
            return
        for key in change.touched_keys():
            if self.is_locked(key):
                raise Forbidden(f"key {key!r} is read-only")

    def _any_locked_key(self, ctx: Any):  # noqa: ANN202
        for batch in ctx.store.scan():
            for key, _ in batch:
                yield self.is_locked(key)


def make_plugin(settings: dict[str, Any]) -> ReadonlyKeys:
    unknown = set(settings) - {"patterns"}
    if unknown:
        raise ValueError(f"unknown setting {sorted(unknown)[0]!r}")
    patterns = settings.get("patterns", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError("patterns must be a list of key patterns")
    return ReadonlyKeys(patterns)
