"""The interface between the store and whatever keeps its records.

The store talks only to ``Journal``: replay every record at start-up, then
append changes and learn, in order, when each is durable. The file journal
(``kvd.log.file``) is the embedded default; ``kvd.log.nats`` puts the records
on a NATS JetStream stream shared by several nodes (docs/nats.md).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from kvd.log.format import Record
from kvd.model import Change


class JournalUnavailable(Exception):
    """The journal cannot take writes now (disk error, failed fsync, closed)."""


class StartupRefused(Exception):
    """The journal cannot be opened as it stands; start-up stops so nothing is mixed or lost."""


class Superseded(Exception):
    """Another writer's record took this one's place; decide the write again on the newer state.

    Only a journal shared by several nodes raises it (the NATS backend). Its
    records are already in the writers' view when it is raised.
    """


@dataclass
class JournalStats:
    """Numbers the metrics plugin reads at scrape time."""

    records: int = 0
    bytes: int = 0
    segments: int = 0
    batches: int = 0
    batched_records: int = 0
    replay_seconds: float = 0.0
    compactions: int = 0
    compaction_seconds: float = 0.0  # the last one's duration


class Journal(abc.ABC):
    """An append-only sequence of records with gap-free ``seq`` and a hash chain.

    ``on_commit`` is called on the event loop for each record, in ``seq``
    order, as soon as it is durable under the fsync policy and before the
    future returned by ``append`` resolves. ``on_abort`` is called on the
    loop when pending appends fail, after which none of them will commit.
    """

    stats: JournalStats
    answers_in_place = False  # whether ``append_then`` is offered
    cancellable_open = False  # whether ``open`` may be cancelled halfway (SIGTERM during start-up)

    def __init__(
        self, on_commit: Callable[[Record], None], on_abort: Callable[[], None]
    ) -> None:
        self.on_commit = on_commit
        self.on_abort = on_abort
        self._pins: dict[object, int] = {}

    def pin(self, seq: int) -> object:
        """Keep records after ``seq`` from being compacted away until ``unpin``.

        A change feed reading history pins where it is, so a compaction that
        runs meanwhile cannot delete the records it has yet to send.
        """
        token = object()
        self._pins[token] = seq
        return token

    def move_pin(self, token: object, seq: int) -> None:
        self._pins[token] = seq

    def unpin(self, token: object) -> None:
        self._pins.pop(token, None)

    def min_pin(self) -> int:
        """One past the oldest seq a reader still needs (a huge number when none is pinned)."""
        return min(self._pins.values(), default=2**63) + 1

    @abc.abstractmethod
    def replay(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Feed every stored record to ``on_commit``; blocking, run it off the loop.

        ``progress(bytes_done, bytes_total)`` is called now and then. Raises
        ``kvd.log.reader.JournalCorrupt`` on damage before the end.
        """

    def serving(self) -> None:  # noqa: B027 - an optional hook: most journals start nothing
        """The store serves now: background work that would slow start-up may begin."""

    async def open(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Start-up: ``replay`` off the loop (a replicated journal also catches up here)."""
        await asyncio.get_running_loop().run_in_executor(None, self.replay, progress)

    @abc.abstractmethod
    def append(self, change: Change) -> asyncio.Future[Record]:
        """Queue a change; the future resolves with its record once durable.

        Must be called on the event loop. Raises JournalUnavailable at once
        when writes are refused; the future fails with it if the write does.
        """

    def append_then(
        self, change: Change, then: Callable[[Record | JournalUnavailable], None]
    ) -> None:
        """Like ``append``, but call ``then`` with the record in the very loop pass that
        applies it (or with the error): a future's waiter wakes one loop pass later,
        which under load is a whole round of every other connection's I/O.

        Only where ``answers_in_place`` is true: a journal that may supersede a
        record (several writers) needs the write decided again instead.
        """
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def writable(self) -> bool:
        """False once writes are refused until restart (e.g. after a failed fsync)."""

    @property
    @abc.abstractmethod
    def last_seq(self) -> int:
        """The seq of the last durable record (0 for an empty journal)."""

    @property
    def retry_can_succeed(self) -> bool:
        """Whether a refused write may succeed later without a restart (503 with Retry-After)."""
        return self.writable

    @property
    def refusal(self) -> str | None:
        """Why writes are refused now, when the journal knows."""
        return None

    @property
    def readiness_problem(self) -> str | None:
        """Why ``/readyz`` should answer 503 now, or None."""
        if self.writable:
            return None
        return self.refusal or "journal refuses writes"

    def extra_metrics(self) -> dict[str, tuple[str, str, float]]:
        """Backend-specific figures for /metrics: name -> ("counter"|"gauge", help, value)."""
        return {}

    async def catch_up(self) -> None:
        """Apply every record the log holds now (``?consistent=1``); a single-node log always has."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and make durable whatever was acknowledged, then release files."""
