"""kvd: JSON values under string keys over HTTP, kept in a hash-chained journal."""

from kvd.hookspecs import hookimpl

__version__ = "0.1.0"

HIDDEN = object()
"""Returned by a ``transform_read`` hook to hide a key from a read."""

__all__ = ["HIDDEN", "__version__", "hookimpl"]
