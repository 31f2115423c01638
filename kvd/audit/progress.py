"""A progress meter on stderr, so a long run over a large journal shows it is alive."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from kvd.audit.base import file_size
from kvd.log.format import Record
from kvd.log.history import Layout

PROGRESS_DELAY_SECONDS = 1.0  # runs shorter than this show no meter at all
PROGRESS_EVERY_SECONDS = 0.25


class Progress:
    """A one-line meter on stderr for long runs; silent unless stderr is a terminal."""

    def __init__(self, label: str, total_bytes: int) -> None:
        self.label = label
        self.total = max(total_bytes, 1)
        self.done = 0
        self.enabled = sys.stderr.isatty()
        self._started = time.monotonic()
        self._next = self._started + PROGRESS_DELAY_SECONDS
        self._shown = False

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + PROGRESS_EVERY_SECONDS
            percent = min(100.0, 100.0 * self.done / self.total)
            sys.stderr.write(
                f"\r{self.label}: {percent:3.0f}% ({self.done >> 20} of {self.total >> 20} MiB)"
            )
            sys.stderr.flush()
            self._shown = True

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")  # clear the meter's line
            sys.stderr.flush()
            self._shown = False

    def records(self, records: Iterable[Record]) -> Iterator[Record]:
        try:
            for record in records:
                self.advance(record.size)
                yield record
        finally:
            self.finish()


def segment_bytes(layout: Layout) -> int:
    """The bytes a full read of the journal goes through: the meter's 100%."""
    return sum(file_size(path) for path in layout.all_segments)

