"""``/keys`` and ``/keys/{id}``: reads from the committed view, writes through the store.

``GET``/``HEAD`` with ``?at=X`` (a seq or an ISO 8601 time) read a past state
instead: the retained history is replayed up to X in a worker thread (from
the newest snapshot at or before it), and the whole state at X is held in
memory for the request.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from tornado.iostream import StreamClosedError

from kvd import HIDDEN, jsonio
from kvd.errors import (
    BadRequest,
    Gone,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    Unavailable,
    UnsupportedMediaType,
    plugin_required,
)
from kvd.handlers.base import (
    JSON_TYPE,
    READ,
    STALL_SECONDS,
    UTF8_CHARSETS,
    WRITE,
    BaseHandler,
    flushed_within,
    media_type_and_charset,
    requested_key,
    unsupported_coding,
)
from kvd.handlers.feed import parse_seq, retained_history
from kvd.log.format import OP_CLEAR, OP_DELETE, OP_PUT, Record, parse_ts
from kvd.log.history import History, HistoryGone
from kvd.log.journal import JournalUnavailable
from kvd.model import Change, Entry, KeyFilter, match_of

MAX_KEY_BYTES = 1024
MERGE_PATCH_TYPE = "application/merge-patch+json"
_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}
LISTING_BATCH = 1000
FLUSH_BYTES = 1 << 18  # a streamed listing is flushed at least this often, whatever the filter keeps
GIVE_WAY_SECONDS = 0.005  # the longest a listing runs before others are served (give_way)
MAX_LIMIT = 10_000
CURSOR_VERSION = b"k"  # the cursor is this byte then the last key returned, base64url


def check_key(key: str) -> str:
    """Return the key, or raise 400 naming what is wrong with it."""
    if not key:
        raise BadRequest("key must not be empty")
    if not _CONTROL.isdisjoint(key):
        raise BadRequest("key must not contain control characters")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("key is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise BadRequest(f"key is {size} bytes; at most {MAX_KEY_BYTES} are allowed")
    return key


def missing_key(key: str) -> NotFound:
    """The 404 of a key that is not there (or that a plugin hides)."""
    return NotFound(f"key {key!r} not found")


def parse_json(body: bytes, depth: int) -> Any:
    """A request body's JSON; 400 when empty or bad. ``depth``: levels above the values."""
    if not body:
        raise BadRequest("body must not be empty")
    try:
        return jsonio.loads(body, max_depth=jsonio.MAX_DEPTH + depth)
    except jsonio.JSONError as exc:
        raise BadRequest(str(exc)) from None


def encode_value(key: str, value: Any, limit: int) -> bytes:
    """A value as stored (compact JSON); 400 if it cannot be, 413 over ``limit`` bytes."""
    try:
        encoded = jsonio.dumps(value)
    except jsonio.JSONError as exc:
        raise BadRequest(f"value of {key!r}: {exc}") from None
    if len(encoded) > limit:
        raise PayloadTooLarge(
            f"value of {key!r} is {len(encoded)} bytes; at most {limit} are allowed"
        )
    return encoded


def etag(entry: Entry) -> str:
    """A key's ETag: its revision in double quotes."""
    return f'"{entry.revision}"'


def key_body(key: str, value: bytes) -> bytes:
    """The body of a one-key answer: ``{"<key>": <value>}``."""
    return b"{" + orjson.dumps(key) + b":" + value + b"}"


def json_members(pairs: Iterable[tuple[str, bytes]]) -> bytes:
    """``"key":value`` members joined by commas, the values' compact JSON as it is.

    One ``orjson.dumps`` of the batch with each value as a Fragment: about
    half the cost of encoding key by key and concatenating.
    """
    return orjson.dumps({key: orjson.Fragment(value) for key, value in pairs})[1:-1]


# --- ?at= ------------------------------------------------------------------------


@dataclass(frozen=True)
class PastState:
    """The store as it was at one point of its history."""

    seq: int
    """The last record applied."""
    moment: float
    """The time asked for, or that record's time; keys expired by then are left out."""
    entries: dict[str, Entry]

    def listing(self, key_filter: KeyFilter | None) -> list[tuple[str, bytes]]:
        """Its keys and values sorted by key (code point order), only those ``key_filter`` matches."""
        keys = sorted(self.entries)
        if key_filter is not None:
            prefix, match = key_filter.prefix, match_of(key_filter)
            keys = [key for key in keys if key.startswith(prefix) and (match is None or match(key))]
        return [(key, self.entries[key].value) for key in keys]


def parse_point(raw: str) -> int | float:
    """``?at=``: a seq (ASCII digits, an int) or an ISO 8601 time (epoch seconds, a float)."""
    if raw.isascii() and raw.isdigit():
        return parse_seq(raw, "at")
    try:
        # RFC 3339 allows a lower-case T and Z; Python's parser does not.
        return parse_ts(raw.upper() if raw.isascii() else raw)
    except (ValueError, OverflowError):
        raise BadRequest(
            f"at must be a sequence number or an ISO 8601 time, not {raw!r}"
        ) from None


def read_past_state(history: History, point: int | float, head: int, now: float) -> PastState:
    """Replay the retained history up to ``point`` (blocking: run it in a worker thread).

    A seq is at most ``head`` (the caller checks). A time at or after ``now``
    is the current state; before the retained history, HistoryGone.
    """
    if isinstance(point, int):
        seq = point
        moment = None
    elif point >= now:
        seq, moment = head, now
    else:
        # Records on disk past ``head`` are not durable yet: not part of any answer.
        seq, moment = min(history.seq_at_time(max(point, 0.0)), head), point
    entries, ts = history.state_at(seq)
    if moment is None:
        moment = parse_ts(ts) if ts is not None else now
    live = {key: entry for key, entry in entries.items() if not entry.expired(moment)}
    return PastState(seq, moment, live)


async def give_way(since: float) -> float:
    """Let the loop serve others when this listing has run ``GIVE_WAY_SECONDS`` since ``since``;
    returns the new ``since``.

    A listing works through the index without waiting on anything: a flush
    the socket takes at once is done already, and a batch the filter empties
    writes nothing. Without this, one long listing (about a second for 200k
    keys) holds up every other request until its end.
    """
    if time.monotonic() - since < GIVE_WAY_SECONDS:
        return since
    await asyncio.sleep(0)
    return time.monotonic()


def past_batches(
    items: list[tuple[str, bytes]], after: str | None, batch: int
) -> Iterator[list[tuple[str, bytes]]]:
    """Like ``Store.scan``, over a past listing: batches of the items after key ``after``."""
    start = 0 if after is None else bisect.bisect_right(items, after, key=lambda item: item[0])
    for index in range(start, len(items), batch):
        yield items[index : index + batch]


class KeysBodyHandler(BaseHandler):
    """Parses a JSON body, answering 415/400 before anything is written.

    Bodies over ``max_body_bytes`` never get here: ``KvdApplication`` answers
    413 from the Content-Length before the body is read, and a chunked body
    as it grows past the limit (``framing.ChunkedBodyLimit``).
    """

    scopes = {"GET": READ, "HEAD": READ, "PUT": WRITE, "PATCH": WRITE, "DELETE": WRITE}
    past_reads = True
    # PATCH names expire_in so that it gets its own message: PATCH keeps the expiry.
    write_parameters = {"PUT": ("expire_in",), "PATCH": ("expire_in",)}

    def check_body_type(self, media_types: tuple[str, ...] = (JSON_TYPE,)) -> None:
        """415 unless the body is sent as one of ``media_types``, in UTF-8, uncompressed."""
        media_type, charset = media_type_and_charset(self.request.headers.get("Content-Type", ""))
        if media_type not in media_types:
            raise UnsupportedMediaType(
                f"body must be sent as {' or '.join(media_types)}, "
                f"not {media_type or 'no content type'}"
            )
        if charset not in UTF8_CHARSETS:
            raise UnsupportedMediaType(f"body must be UTF-8 JSON, not charset={charset}")
        coding = unsupported_coding(self.request.headers.get("Content-Encoding"))
        if coding is not None:
            raise UnsupportedMediaType(
                f"Content-Encoding {coding} is not supported: send the body uncompressed"
            )

    def json_body(self, media_types: tuple[str, ...] = (JSON_TYPE,), depth: int = 1) -> Any:
        """The parsed body; 415 for another content type, 413 over the limit, 400 if bad.

        ``depth`` is how many levels the body adds above the values it holds.
        """
        self.check_body_type(media_types)
        return parse_json(self.request.body, depth)

    def refuse_body(self) -> None:
        """A DELETE takes no body: 415 for one not sent as JSON (as for any body), else 400.

        Never ignored: a ``DELETE /keys`` whose body lists keys, meant as a
        multi-delete, would otherwise delete every key.
        """
        if self.request.body:
            self.check_body_type()
            raise BadRequest("DELETE takes no body")

    def encode_value(self, key: str, value: Any) -> bytes:
        return encode_value(key, value, self.ctx.config.server.max_value_bytes)

    def expiry_for_write(self) -> float | None:
        raw = self.query("expire_in")
        if raw is None:
            return None
        expires_at = self.ctx.plugins.hook.resolve_expiry(expire_in=raw, now=self.store.clock())
        if expires_at is None:
            raise plugin_required("expire_in", "expiry")
        return expires_at

    def visible(self, batch: list[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        """Pairs as readers see them, after any ``transform_read`` plugin."""
        if not self.ctx.reads_transformed:
            yield from batch
            return
        transform = self.ctx.plugins.hook.transform_read
        for key, value in batch:
            replaced = transform(key=key, value=value)
            if replaced is not HIDDEN:
                yield key, value if replaced is None else replaced

    async def consistent(self) -> None:
        """``?consistent=1``: apply everything the journal holds before reading (503 if unreachable)."""
        raw = self.query("consistent")
        if raw is None or raw == "0":
            return
        if raw != "1":
            raise BadRequest("consistent must be 0 or 1")
        try:
            await self.ctx.journal.catch_up()
        except JournalUnavailable as exc:
            raise Unavailable(str(exc), headers={"Retry-After": "1"}) from None

    async def past_state(self) -> PastState | None:
        """The state ``?at=`` asks for (None without it): 400 past the head, 410 before the history."""
        raw = self.query("at")
        if raw is None:
            return None
        point = parse_point(raw)
        history = retained_history(self.ctx)
        head = self.ctx.journal.last_seq
        if isinstance(point, int) and point > head:
            raise BadRequest(f"at={point} is beyond the newest revision, {head}")
        loop = asyncio.get_running_loop()
        replay = functools.partial(read_past_state, history, point, head, self.store.clock())
        try:
            try:
                return await loop.run_in_executor(None, replay)
            except HistoryGone:
                # A compaction may have retired files under the replay: look once more.
                return await loop.run_in_executor(None, replay)
        except HistoryGone:
            raise Gone(
                f"at={raw} is older than the retained history: compaction retired it "
                "(keep it with [journal] archive = true)"
            ) from None

    async def commit(self, change: Change | Callable[[], Change]) -> Record:
        """Validate through plugins, journal, and wait until durable and visible.

        A write that depends on the current state passes a function that
        checks it and builds the change; it runs again if another node's
        write came first (see ``Store.write``).
        """
        prepare = change if callable(change) else (lambda: change)

        def checked() -> Change:
            built = prepare()
            built.actor = self.principal
            if self.ctx.config.journal.record_client:
                built.client = self.request.remote_ip
            if self.ctx.writes_validated:
                self.ctx.plugins.hook.validate_write(ctx=self.ctx, change=built)
            return built

        return await self.store.write(checked)


class KeysHandler(KeysBodyHandler):
    endpoint = "/keys"
    STALL_SECONDS = STALL_SECONDS  # a listing whose client reads nothing that long is cut off

    async def get(self) -> None:
        self.require_ready()
        key_filter = self._key_filter()
        limit = self._limit()
        after = self._cursor()
        await self.consistent()
        past = await self.past_state()
        items = None
        if past is not None:
            loop = asyncio.get_running_loop()
            items = await loop.run_in_executor(None, past.listing, key_filter)
        self.set_header("Content-Type", JSON_TYPE)
        if limit is None and after is None:
            await self._stream_all(key_filter, items)
            return
        page, more = await self._page(key_filter, after, limit or MAX_LIMIT, items)
        if more:
            self.set_header("Link", f'<{self._next_url(page[-1][0], limit)}>; rel="next"')
        self.finish(b"{" + json_members(page) + b"}")

    # GET's answer, whose body Tornado leaves out of a HEAD: the same checks and headers, and
    # GET's Content-Length, except for a listing long enough to be streamed (sent chunked).
    head = get

    def _batches(
        self, key_filter: KeyFilter | None, after: str | None, batch: int,
        past: list[tuple[str, bytes]] | None,
    ) -> Iterator[list[tuple[str, bytes]]]:
        """Keys and values in key order, from the store or from a past listing (already filtered)."""
        if past is not None:
            return past_batches(past, after, batch)
        return self.store.scan(key_filter, after=after, batch=batch)

    async def _stream_all(
        self, key_filter: KeyFilter | None, past: list[tuple[str, bytes]] | None
    ) -> None:
        opened = False
        unflushed = 0
        given_way = time.monotonic()
        for batch in self._batches(key_filter, None, LISTING_BATCH, past):
            members = json_members(self.visible(batch))
            if members:
                self.write((b"," if opened else b"{") + members)
                opened = True
                unflushed += len(members)
            if opened and (len(batch) >= LISTING_BATCH or unflushed >= FLUSH_BYTES):
                unflushed = 0  # stream: never build the whole listing in memory
                try:
                    if not await flushed_within(self, self.STALL_SECONDS, "a listing"):
                        return
                except StreamClosedError:
                    return  # the client hung up (``| head``, a timeout): nothing to log, no one to tell
            given_way = await give_way(given_way)
        self.finish(b"}" if opened else b"{}")

    async def _page(
        self, key_filter: KeyFilter | None, after: str | None, limit: int,
        past: list[tuple[str, bytes]] | None,
    ) -> tuple[list[tuple[str, bytes]], bool]:
        """Up to ``limit`` visible pairs after ``after``, and whether more remain."""
        page: list[tuple[str, bytes]] = []
        given_way = time.monotonic()
        for batch in self._batches(key_filter, after, min(limit + 1, LISTING_BATCH), past):
            for pair in self.visible(batch):
                if len(page) == limit:
                    return page, True
                page.append(pair)
            given_way = await give_way(given_way)  # a filter that matches little scans far
        return page, False

    def _limit(self) -> int | None:
        raw = self.query("limit")
        if raw is None:
            return None
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
        return int(raw)

    def _cursor(self) -> str | None:
        raw = self.query("cursor")
        if raw is None:
            return None
        try:
            decoded = base64.urlsafe_b64decode(raw.encode("ascii") + b"=" * (-len(raw) % 4))
            version, key = decoded[:1], decoded[1:].decode("utf-8")
        except (ValueError, UnicodeError):
            raise BadRequest("cursor is not one this server gave out") from None
        if version != CURSOR_VERSION or not key:
            raise BadRequest("cursor is not one this server gave out")
        return key

    def _next_url(self, last_key: str, limit: int | None) -> str:
        cursor = base64.urlsafe_b64encode(CURSOR_VERSION + last_key.encode()).rstrip(b"=").decode()
        params = {"limit": str(limit or MAX_LIMIT), "cursor": cursor}
        for name in ("filter", "at"):
            value = self.query(name)
            if value is not None:
                params[name] = value
        return "/keys?" + urlencode(params, quote_via=quote)

    def _key_filter(self) -> KeyFilter | None:
        pattern = self.query("filter")
        if pattern is None:
            return None
        compiled = self.ctx.plugins.hook.compile_filter(pattern=pattern)
        if compiled is None:
            raise plugin_required("filter", "filter")
        return compiled

    def _check_collection_preconditions(self) -> None:
        """If-Match / If-None-Match on PUT or DELETE /keys, as RFC 9110 section 13.1 has them
        for a resource that always exists and has no ETag: ``If-Match: *`` holds, a list of
        tags never does, ``If-None-Match: *`` never does. Never ignored: a stale If-Match
        must not let DELETE /keys clear every key."""
        if_match = self.request.headers.get("If-Match")
        if if_match is not None and if_match.strip() != "*":
            raise PreconditionFailed(
                "/keys has no ETag, so If-Match on it can only be '*'; "
                "condition each key's write on /keys/{id} instead"
            )
        if none_match_star(self.request.headers.get("If-None-Match")):
            raise PreconditionFailed("/keys always exists, so If-None-Match: * never holds for it")

    async def put(self) -> None:
        self.require_ready()
        body = self.json_body()
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object of key/value pairs")
        if not body:
            raise BadRequest("body must hold at least one key/value pair")
        most = self.ctx.config.server.max_keys_per_request
        if len(body) > most:
            raise PayloadTooLarge(f"body holds {len(body)} keys; at most {most} per request")
        expires_at = self.expiry_for_write()
        values = {check_key(key): self.encode_value(key, value) for key, value in body.items()}
        expires = dict.fromkeys(values, expires_at) if expires_at is not None else {}
        self._check_collection_preconditions()
        record = await self.commit(Change(op=OP_PUT, set=values, expires=expires))
        self.send_json(orjson.dumps({"revision": record.seq, "stored": list(values)}))

    async def delete(self) -> None:
        self.require_ready()
        self.refuse_body()
        self._check_collection_preconditions()
        await self.commit(Change(op=OP_CLEAR))
        self.set_status(204)
        self.finish()


class KeyHandler(KeysBodyHandler):
    endpoint = "/keys/{id}"

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """The key (the route's one unnamed group) from the bytes the client sent: Tornado
        unescapes it from the request line's Latin-1 text, which garbles raw UTF-8."""
        if name is None:
            return requested_key(self.request)
        return super().decode_argument(value, name)

    async def _read(self, key: str) -> bytes:
        self.require_ready()
        check_key(key)
        await self.consistent()
        past = await self.past_state()
        entry = self.store.get(key) if past is None else past.entries.get(key)
        visible = [] if entry is None else list(self.visible([(key, entry.value)]))
        # RFC 9110 section 13.2.2: If-Match first (412 for an absent key too), then If-None-Match.
        check_if_match(key, self.request.headers.get("If-Match"), entry if visible else None)
        if entry is None or not visible:  # absent, or hidden by a plugin
            raise missing_key(key)
        value = visible[0][1]
        tag = etag(entry)
        self.set_header("ETag", tag)
        if etag_matches(self.request.headers.get("If-None-Match"), tag):
            self.set_status(304)
            return b""
        return value

    async def get(self, key: str) -> None:
        value = await self._read(key)
        if self.get_status() == 304:
            self.finish()
            return
        self.send_json(key_body(key, value))

    head = get  # Tornado sends GET's headers, its Content-Length too, and leaves out the body

    async def put(self, key: str) -> None:
        self.require_ready()
        check_key(key)
        value = self.encode_value(key, self.json_body(depth=0))
        expires_at = self.expiry_for_write()
        expires = {key: expires_at} if expires_at is not None else {}
        created = False

        def prepare() -> Change:
            nonlocal created
            current = self.store.current(key)
            self._check_preconditions(key, current)
            created = current is None
            return Change(op=OP_PUT, set={key: value}, expires=dict(expires))

        record = await self.commit(prepare)
        self.set_header("ETag", f'"{record.seq}"')
        self.send_json(key_body(key, value), 201 if created else 200)

    async def patch(self, key: str) -> None:
        self.require_ready()
        check_key(key)
        patch = self.json_body((MERGE_PATCH_TYPE, JSON_TYPE), depth=0)
        if self.query("expire_in") is not None:
            raise BadRequest("PATCH keeps the key's expiry; set a new one with PUT ?expire_in=")
        value = b""

        def prepare() -> Change:
            nonlocal value
            current = self.store.current(key)
            self._check_preconditions(key, current)
            if current is None:
                raise missing_key(key)
            merged = merge_patch(jsonio.loads(current.value, max_depth=None), patch)
            value = self.encode_value(key, merged)
            expires = {key: current.expires_at} if current.expires_at is not None else {}
            return Change(op=OP_PUT, set={key: value}, expires=expires)

        record = await self.commit(prepare)
        self.set_header("ETag", f'"{record.seq}"')
        self.send_json(key_body(key, value))

    async def delete(self, key: str) -> None:
        self.require_ready()
        check_key(key)
        self.refuse_body()

        def prepare() -> Change:
            self._check_preconditions(key, self.store.current(key))
            return Change(op=OP_DELETE, keys=(key,))

        await self.commit(prepare)
        self.set_status(204)
        self.finish()

    def _check_preconditions(self, key: str, current: Entry | None) -> None:
        """If-Match / If-None-Match: * against what writers see (RFC 9110 section 13), on
        every write: a precondition the client sent is never ignored.

        The caller journals the write right after, with no await in between,
        so check and write are one atomic compare-and-set.
        """
        check_if_match(key, self.request.headers.get("If-Match"), current)
        if none_match_star(self.request.headers.get("If-None-Match")) and current is not None:
            raise PreconditionFailed(f"key {key!r} already exists")


def check_if_match(key: str, header: str | None, current: Entry | None) -> None:
    """If-Match (RFC 9110 section 13.1.1), on reads and writes: 412 unless the key exists
    and its ETag is one of those listed (``*``: any); nothing when the header is absent."""
    if header is None:
        return
    if current is None:
        raise PreconditionFailed(f"key {key!r} is absent")
    if not _etag_matches_strongly(header, etag(current)):
        raise PreconditionFailed(f"key {key!r} is at revision {etag(current)}, not {header}")


def none_match_star(header: str | None) -> bool:
    """Whether a write's If-None-Match is ``*`` (False when absent); 400 for anything
    else, which no write here takes."""
    if header is None:
        return False
    if header.strip() != "*":
        raise BadRequest("If-None-Match on a write only takes '*'")
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: objects merge recursively, null removes, the rest replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def etag_matches(header: str | None, tag: str) -> bool:
    """If-None-Match: weak comparison, ``*`` matches any current entry."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == tag for candidate in header.split(","))


def _etag_matches_strongly(header: str, tag: str) -> bool:
    """If-Match uses strong comparison (RFC 9110 section 13.1.1): a weak tag never matches."""
    if header.strip() == "*":
        return True
    return any(candidate.strip() == tag for candidate in header.split(","))
