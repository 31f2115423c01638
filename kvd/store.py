"""The in-memory state, kept in step with the journal.

Two views of the data:
- the committed view (``_packed``, ``_expiry`` and the sorted ``_index``)
  holds only records the journal has made durable; every read uses it, so a
  write is visible only once it is durable;
- the writers' view adds the changes queued in the journal but not yet
  durable (``_pending``), so validations, deletes of just-written keys and
  expiry sweeps decide against the latest state, in journal order.

Memory: one bytes object per live key, its value as compact JSON followed by
its revision (``_pack``): an Entry, a bytes and an int would cost about 80
bytes a key more, which at a million keys is most of the overhead. Entries
are built when read. Keys with an expiry have it in ``_expiry``; every key
is in a sorted list for listings; one pending Entry per key with a write in
flight. All methods run on the event loop, except
``apply`` during replay, which runs before the store reports ready.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from operator import add
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

from kvd.errors import KvdError, NotFound, Unavailable
from kvd.log.format import OP_CLEAR, OP_DELETE, OP_EXPIRE, OP_PUT, Record, format_ts, parse_ts
from kvd.log.journal import Journal, JournalUnavailable, Superseded
from kvd.log.simple_puts import REVISION as _REVISION  # after the value in each packed entry
from kvd.log.snapshot import EntryBatch
from kvd.model import Change, Entry, KeyFilter, match_of

if TYPE_CHECKING:
    from kvd.log.seal import PutRun

_REVISION_BYTES = _REVISION.size


def _pack(value: bytes, revision: int) -> bytes:
    return value + _REVISION.pack(revision)


def sorted_list_of(keys_in_order: list[str]) -> SortedList:
    """A SortedList of keys already in order, built without a second copy of them.

    ``SortedList(keys)`` sorts a copy and slices it while both exist: 16 MiB
    at 1M keys, at start-up's peak. Here the sublists are cut from the end of
    ``keys_in_order``, which is emptied as they are (a list gives memory back
    as it halves), so at most half a copy exists at a time.

    Fills the sublists as ``SortedList.update`` does into an empty list
    (sortedcontainers 2.x, pinned in pyproject.toml); tests/test_seal.py
    checks the result with SortedList's own ``_check``.
    """
    index = SortedList()
    load = index._load
    count = len(keys_in_order)
    sublists = []
    while keys_in_order:
        start = (len(keys_in_order) - 1) // load * load
        sublists.append(keys_in_order[start:])
        del keys_in_order[start:]
    sublists.reverse()
    index._lists = sublists
    index._maxes = [sublist[-1] for sublist in sublists]
    index._len = count
    return index


def concatenated(runs: list[list[str]], total: int) -> list[str]:
    """One list of ``total`` keys from ``runs``, emptying ``runs`` as it goes: the
    list is allocated once at its size, and each run is freed once copied."""
    keys: list[str | None] = [None] * total
    at = 0
    runs.reverse()
    while runs:
        run = runs.pop()
        keys[at : at + len(run)] = run
        at += len(run)
    assert at == total, (at, total)  # else Nones would be left to sort among the keys
    return keys  # type: ignore[return-value]


def _unpack(packed: bytes, expires_at: float | None) -> Entry:
    return Entry(
        packed[:-_REVISION_BYTES],
        _REVISION.unpack_from(packed, len(packed) - _REVISION_BYTES)[0],
        expires_at,
    )


class Store:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.journal: Journal | None = None
        self.ready = False
        self.observers: list[Callable[[Record], None]] = []
        self._packed: dict[str, bytes] = {}  # key -> value + revision (_pack)
        self._expiry: dict[str, float] = {}  # committed keys that have an expiry
        self._index: SortedList = SortedList()
        self._pending: dict[str, tuple[int, Entry | None]] = {}
        self._pending_clear: int | None = None  # ordinal of the newest queued clear
        self._ordinals = itertools.count(1)
        self._pending_order: deque[int] = deque()  # ordinals of queued writes, journal order
        # (expires_at, key) of committed entries with an expiry; stale items
        # (key since rewritten or removed) are skipped when they surface.
        self._expiry_heap: list[tuple[float, str]] = []
        self.live_bytes = 0  # keys + values of committed entries, in bytes (counted at finish_replay)
        # The lists of keys replay stored, for the index; None once they stop
        # holding each key exactly once (_note_replay_keys).
        self._replay_keys: list[list[str]] | None = []
        self._replay_key_count = 0

    def attach(self, journal: Journal) -> None:
        self.journal = journal

    def restore(self, batch: EntryBatch) -> None:
        """Load entries of a snapshot (start-up only, before any record is applied)."""
        packed = map(add, batch.values, map(_REVISION.pack, batch.revisions))
        self._packed.update(zip(batch.keys, packed, strict=True))
        self._note_replay_keys(batch.keys)
        if batch.expiries is not None:
            expiry = self._expiry
            for key, expires_at in zip(batch.keys, batch.expiries, strict=True):
                if expires_at is None:
                    expiry.pop(key, None)
                else:
                    expiry[key] = expires_at

    def committed_entries(self) -> dict[str, Entry]:
        """A copy of the committed view as Entries (for tools and tests: it builds one per key)."""
        expiry = self._expiry
        return {key: _unpack(packed, expiry.get(key)) for key, packed in self._packed.items()}

    def snapshot_view(self) -> Iterator[tuple[str, Entry]]:
        """A consistent copy of the committed state, to iterate in key order later.

        Shallow copies are enough: ``apply`` replaces packed values, never
        changes one. Taken on the loop (about 0.2 s for 1M keys), so it serves
        only where a forked snapshot writer is not available.
        """
        keys, packed, expiry = list(self._index), dict(self._packed), dict(self._expiry)
        return ((key, _unpack(packed[key], expiry.get(key))) for key in keys)

    def ordered_items(self) -> Iterator[tuple[str, Entry]]:
        """Committed entries in key order (for a snapshot writer that owns a copy of the store)."""
        packed, expiry = self._packed, self._expiry
        for key in self._index:
            yield key, _unpack(packed[key], expiry.get(key))

    def finish_replay(self) -> None:
        """Build the sorted index once (replay skips it: one sort beats a million inserts)
        and count the live bytes (replay skips that too)."""
        self._index = self._build_index()
        self._rebuild_expiry_heap()
        keys = self._packed.keys()
        non_ascii = itertools.filterfalse(str.isascii, keys)  # counted again, as UTF-8
        self.live_bytes = (
            sum(map(len, keys))
            + sum(len(key.encode()) - len(key) for key in non_ascii)
            + sum(map(len, self._packed.values()))
            - _REVISION_BYTES * len(self._packed)
        )
        self.ready = True

    def _note_replay_keys(self, keys: list[str]) -> None:
        """Keep the lists of keys replay stores, while each key comes exactly once.

        Then they are the store's keys, and snapshots and seals give them in
        key order: sorting runs that are in order is a merge, for 1M keys from
        seals about a fifth of the time of sorting the dict's keys. A key stored
        twice, or by a record replayed in full (``apply``), ends it; so does, at
        the end, any key deleted (there are then fewer keys than noted).
        """
        if self._replay_keys is None:
            return
        self._replay_keys.append(keys)
        self._replay_key_count += len(keys)
        if self._replay_key_count != len(self._packed):
            self._replay_keys = None

    def _build_index(self) -> SortedList:
        """The sorted index of the store's keys: from the noted lists when they hold them all."""
        noted, self._replay_keys = self._replay_keys, None
        if not noted or self._replay_key_count != len(self._packed):  # a key deleted since
            return SortedList(self._packed)
        keys = concatenated(noted, self._replay_key_count)
        keys.sort()  # runs in order: a merge
        return sorted_list_of(keys)

    # --- reads (committed view) --------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The key's durable entry, or None when absent or expired."""
        packed = self._packed.get(key)
        if packed is None:
            return None
        expires_at = self._expiry.get(key) if self._expiry else None
        if expires_at is not None and expires_at <= self.clock():
            return None
        return _unpack(packed, expires_at)

    def _committed(self, key: str) -> Entry | None:
        """The key's durable entry, expired or not."""
        packed = self._packed.get(key)
        return None if packed is None else _unpack(packed, self._expiry.get(key))

    def scan(
        self, key_filter: KeyFilter | None = None, *, after: str | None = None, batch: int = 1000
    ) -> Iterator[list[tuple[str, bytes]]]:
        """Live keys and their values in key order, in batches, resuming after the last key seen.

        Values only, not Entries: a listing needs nothing else, and building
        an Entry per key costs a large listing about a fifth of its speed.

        Each batch is taken afresh from the index, so the store may change
        between batches; a key that exists throughout is yielded exactly once.
        A batch is empty when none of its ``batch`` keys matched.
        """
        prefix = key_filter.prefix if key_filter is not None else ""
        match = match_of(key_filter)
        upper = _prefix_upper_bound(prefix)
        lower = after if after is not None and after >= prefix else prefix
        inclusive_lower = after is None or after < prefix
        while True:
            keys = list(
                itertools.islice(
                    self._index.irange(lower, upper, inclusive=(inclusive_lower, False)), batch
                )
            )
            if not keys:
                return
            # Comprehensions, not a loop: a listing spends most of its store time here.
            # Every indexed key is in _packed (apply keeps them in step, and no
            # await falls between taking the keys and reading their values).
            packed, expiry, now = self._packed, self._expiry, self.clock()
            matched = keys if match is None else list(filter(match, keys))
            found = [(key, packed[key][:-_REVISION_BYTES]) for key in matched]
            if expiry:
                found = [
                    (key, value) for key, value in found
                    if (expires_at := expiry.get(key)) is None or expires_at > now
                ]
            yield found  # also when empty: the caller gets control after every batch of the index
            if len(keys) < batch:
                return
            lower, inclusive_lower = keys[-1], False

    def __len__(self) -> int:
        return len(self._packed)

    # --- writes (writers' view) --------------------------------------------

    def current(self, key: str) -> Entry | None:
        """What the key holds once every queued write is durable (None: absent)."""
        pending = self._pending.get(key)
        if pending is not None:
            entry = pending[1]
        elif self._pending_clear is not None:
            entry = None
        else:
            entry = self._committed(key)
        if entry is None or entry.expired(self.clock()):
            return None
        return entry

    async def write(self, change: Change | Callable[[], Change]) -> Record:
        """Journal a change and wait until it is durable and applied.

        Raises NotFound for a delete of an absent key, Unavailable when the
        journal refuses the write. Nothing changes when it raises.

        Invariant: everything up to the journal append runs without yielding
        to the event loop, so a caller that checks ``current()`` and then
        awaits this (with no await in between) performs an atomic
        compare-and-set against every other write.

        A write whose checks read the state (preconditions, merges) passes a
        function that checks and builds the change: when a journal shared by
        several nodes reports the record ``Superseded`` by another node's,
        the function runs again on the newer state, so the outcome is as if
        this write had come after the other.
        """
        prepare = change if callable(change) else (lambda: change)
        while True:
            built = self._prepared(prepare)
            try:
                return await self._submit(built)
            except Superseded:
                continue

    @property
    def answers_in_place(self) -> bool:
        """Whether ``write_then`` may be used (the journal never supersedes a record)."""
        return self.journal is not None and self.journal.answers_in_place

    def write_then(
        self, prepare: Callable[[], Change], then: Callable[[Record | KvdError], None]
    ) -> None:
        """``write`` for a caller that answers from a callback: ``then`` gets the record
        in the loop pass that applies it, one pass sooner than ``await write``.

        Only when ``answers_in_place``. Raises KvdError at once for what is
        refused at once (NotFound, Unavailable); ``then`` gets a later failure.
        """
        change = self._prepared(prepare)

        def answer(result: Record | JournalUnavailable) -> None:
            then(self._unavailable(result) if isinstance(result, JournalUnavailable) else result)

        self._append(change, answer)

    def _prepared(self, prepare: Callable[[], Change]) -> Change:
        """The change ``prepare`` builds; NotFound for a delete of an absent key."""
        change = prepare()
        if change.op == OP_DELETE and any(self.current(key) is None for key in change.keys):
            raise NotFound(f"key {change.keys[0]!r} not found")
        return change

    def take_expired(self, limit: int) -> list[str]:
        """Up to ``limit`` keys whose expiry has passed, as writers see them.

        The caller must journal their removal (op ``expire``) at once, or
        hand them back with ``return_expired`` if that fails.
        """
        now = self.clock()
        heap = self._expiry_heap
        found: dict[str, None] = {}  # a key rewritten with the same expiry has two heap items
        while heap and heap[0][0] <= now and len(found) < limit:
            expires_at, key = heapq.heappop(heap)
            entry = self.current_raw(key)
            if entry is not None and entry.expires_at == expires_at:
                found[key] = None
        return list(found)

    def return_expired(self, keys: list[str]) -> None:
        """Put back keys from ``take_expired`` whose removal was not journaled."""
        for key in keys:
            expires_at = self._expiry.get(key)
            if expires_at is not None:
                heapq.heappush(self._expiry_heap, (expires_at, key))

    def next_expiry(self) -> float | None:
        """The earliest expiry time still to be swept, if any."""
        return self._expiry_heap[0][0] if self._expiry_heap else None

    def current_raw(self, key: str) -> Entry | None:
        """Like ``current`` but returns expired entries too."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending[1]
        if self._pending_clear is not None:
            return None
        return self._committed(key)

    async def _submit(self, change: Change) -> Record:
        future = self._append(change)
        assert future is not None
        try:
            # Not shielded: a cancelled waiter cannot unwrite the record, and
            # shield() would cost one more loop pass per write.
            record = await future
        except JournalUnavailable as exc:
            raise self._unavailable(exc) from None
        return record

    def _append(
        self, change: Change, then: Callable[[Record | JournalUnavailable], None] | None = None
    ) -> asyncio.Future[Record] | None:
        """Hand a change to the journal and note it in the writers' view (no await before)."""
        if self.journal is None or not self.ready:
            raise Unavailable("the store is starting", headers={"Retry-After": "1"})
        if change.expires:
            # The journal keeps expiry times to the microsecond: keep exactly
            # that here too, or a restart could move an expiry by a fraction.
            change.expires = {key: parse_ts(format_ts(at)) for key, at in change.expires.items()}
        try:
            if then is None:
                future = self.journal.append(change)
            else:
                future = None
                self.journal.append_then(change, then)
        except JournalUnavailable as exc:
            raise self._unavailable(exc) from None
        self._note_pending(change, next(self._ordinals))
        return future

    def _unavailable(self, exc: JournalUnavailable) -> Unavailable:
        """503; ``Retry-After`` only when a retry can succeed without a restart."""
        retry = self.journal is not None and self.journal.retry_can_succeed
        return Unavailable(str(exc), headers={"Retry-After": "1"} if retry else None)

    def note_record(self, record: Record) -> None:
        """Another node's record is on its way to ``apply``: writers see it from now on."""
        ordinal = next(self._ordinals)
        if record.op == OP_PUT:
            for key, value in record.set.items():
                self._pending[key] = (ordinal, Entry(value, record.seq, record.expires.get(key)))
            self._pending_order.append(ordinal)
        else:
            self._note_pending(Change(op=record.op, keys=record.keys), ordinal)

    def _note_pending(self, change: Change, ordinal: int) -> None:
        if change.op == OP_CLEAR:
            self._pending.clear()
            self._pending_clear = ordinal
        elif change.op == OP_PUT:
            for key, value in change.set.items():
                entry = Entry(value, 0, change.expires.get(key))
                self._pending[key] = (ordinal, entry)
        else:
            for key in change.keys:
                self._pending[key] = (ordinal, None)
        self._pending_order.append(ordinal)

    # --- applying committed records ----------------------------------------

    def apply(self, record: Record) -> None:
        """Make a durable record visible; the journal calls this in seq order."""
        packed, expiry = self._packed, self._expiry
        if record.op == OP_PUT:
            expires = record.expires
            for key, value in record.set.items():
                old = packed.get(key)
                if old is None:
                    if self.ready:
                        self._index.add(key)
                    else:
                        self._replay_keys = None  # a key the noted lists miss (_note_replay_keys)
                    self.live_bytes += len(key.encode()) + len(value)
                else:
                    self.live_bytes += len(value) - (len(old) - _REVISION_BYTES)
                packed[key] = _pack(value, record.seq)
                expires_at = expires.get(key)
                if expires_at is None:
                    expiry.pop(key, None)
                else:
                    expiry[key] = expires_at
                    heapq.heappush(self._expiry_heap, (expires_at, key))
        elif record.op in (OP_DELETE, OP_EXPIRE):
            for key in record.keys:
                old = packed.pop(key, None)
                if old is not None:
                    if self.ready:
                        self._index.remove(key)
                    self.live_bytes -= len(key.encode()) + len(old) - _REVISION_BYTES
                    expiry.pop(key, None)
        elif record.op == OP_CLEAR:
            packed.clear()
            expiry.clear()
            self._index.clear()
            self.live_bytes = 0
            self._expiry_heap.clear()
        if len(self._expiry_heap) > 2 * len(expiry) + 1024:
            self._rebuild_expiry_heap()
        if self._pending_order:
            self._settle_pending(record)
        if self.ready:
            for observe in self.observers:
                observe(record)

    def replay_puts(self, puts: PutRun) -> None:
        """Apply a run of simple puts (one key, no expiry) read at start-up, from the
        journal's lines or from a seal.

        The same as ``apply`` on their records, without building them: replay
        of a large journal is mostly these (start-up only, before ready, so
        neither the index nor the live bytes are kept up: ``finish_replay``).
        """
        for keys, packed in puts.entries():
            if self._expiry:
                for key in self._expiry.keys() & keys:
                    del self._expiry[key]
            self._packed.update(zip(keys, packed, strict=True))
            self._note_replay_keys(keys)

    def _settle_pending(self, record: Record) -> None:
        """Drop pending entries whose newest queued write is this record."""
        ordinal = self._pending_order.popleft()
        if record.op == OP_CLEAR:
            if self._pending_clear == ordinal:
                self._pending_clear = None
            return
        for key in record.set or record.keys:
            pending = self._pending.get(key)
            if pending is not None and pending[0] == ordinal:
                del self._pending[key]

    def _rebuild_expiry_heap(self) -> None:
        """Drop stale heap items so rewrites of expiring keys cannot grow it without bound."""
        self._expiry_heap = [(expires_at, key) for key, expires_at in self._expiry.items()]
        heapq.heapify(self._expiry_heap)

    def reset(self) -> None:
        """Forget everything loaded (start-up only: a replicated journal replaces a stale local copy)."""
        assert not self.ready and not self._pending
        self._packed = {}
        self._expiry = {}
        self._index = SortedList()
        self._expiry_heap = []
        self.live_bytes = 0

    def abort_pending(self) -> None:
        """Every queued write failed: forget them all."""
        self._pending.clear()
        self._pending_clear = None
        self._pending_order.clear()


def _prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    if not prefix:
        return None
    last = ord(prefix[-1])
    if last == 0x10FFFF:
        return _prefix_upper_bound(prefix[:-1])
    return prefix[:-1] + chr(last + 1)
