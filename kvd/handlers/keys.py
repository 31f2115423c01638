"""``/keys`` and ``/keys/{id}``: reads from the committed view, writes through the store."""

from __future__ import annotations

from typing import Any

import orjson
from tornado.web import stream_request_body

from kvd import HIDDEN, jsonio
from kvd.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    plugin_required,
)
from kvd.handlers.base import JSON_TYPE, BaseHandler
from kvd.log.format import OP_CLEAR, OP_DELETE, OP_PUT
from kvd.model import Change, Entry, KeyFilter

MAX_KEY_BYTES = 1024
_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}
LISTING_BATCH = 1000


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


def etag(entry: Entry) -> str:
    return f'"{entry.revision}"'


@stream_request_body
class KeysBodyHandler(BaseHandler):
    """Reads a JSON body under the size limit, answering 413/415 before parsing."""

    def prepare(self) -> None:
        super().prepare()
        self._body = bytearray()
        self._too_large = False
        self._max_body = self.ctx.config.server.max_body_bytes
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise PayloadTooLarge(f"body is larger than {self._max_body} bytes")
        # Let chunked bodies run a little past the limit so we answer 413, not tornado.
        self.request.connection.set_max_body_size(self._max_body + 1)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        if len(self._body) + len(chunk) > self._max_body:
            self._too_large = True
            return
        self._body += chunk

    def json_body(self) -> Any:
        """The parsed body; 415 for a non-JSON content type, 413 over the limit, 400 if bad."""
        content_type = self.request.headers.get("Content-Type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != JSON_TYPE:
            raise UnsupportedMediaType(
                f"body must be sent as {JSON_TYPE}, not {media_type or 'no content type'}"
            )
        if self._too_large:
            raise PayloadTooLarge(f"body is larger than {self._max_body} bytes")
        if not self._body:
            raise BadRequest("body must not be empty")
        try:
            return jsonio.loads(bytes(self._body), max_depth=jsonio.MAX_DEPTH + 1)
        except jsonio.JSONError as exc:
            raise BadRequest(str(exc)) from None

    def encode_value(self, key: str, value: Any) -> bytes:
        try:
            encoded = jsonio.dumps(value)
        except jsonio.JSONError as exc:
            raise BadRequest(f"value of {key!r}: {exc}") from None
        limit = self.ctx.config.server.max_value_bytes
        if len(encoded) > limit:
            raise PayloadTooLarge(
                f"value of {key!r} is {len(encoded)} bytes; at most {limit} are allowed"
            )
        return encoded

    def expiry_for_write(self) -> float | None:
        raw = self.query("expire_in")
        if raw is None:
            return None
        expires_at = self.ctx.plugins.hook.resolve_expiry(expire_in=raw, now=self.store.clock())
        if expires_at is None:
            raise plugin_required("expire_in", "expiry")
        return expires_at

    async def commit(self, change: Change):  # noqa: ANN201 - returns a Record
        if self.ctx.writes_validated:
            self.ctx.plugins.hook.validate_write(ctx=self.ctx, change=change)
        return await self.store.write(change)


class KeysHandler(KeysBodyHandler):
    endpoint = "/keys"

    async def get(self) -> None:
        self.require_ready()
        key_filter = self._key_filter()
        self.set_header("Content-Type", JSON_TYPE)
        transform = self.ctx.plugins.hook.transform_read if self.ctx.reads_transformed else None
        opened = False
        for batch in self.store.scan(key_filter, batch=LISTING_BATCH):
            parts = []
            for key, entry in batch:
                value = entry.value
                if transform is not None:
                    replaced = transform(key=key, value=value)
                    if replaced is HIDDEN:
                        continue
                    value = replaced if replaced is not None else value
                parts.append(orjson.dumps(key) + b":" + value)
            if not parts:
                continue
            self.write((b"," if opened else b"{") + b",".join(parts))
            opened = True
            if len(batch) >= LISTING_BATCH:
                await self.flush()  # stream: never build the whole listing in memory
        self.finish(b"}" if opened else b"{}")

    def _key_filter(self) -> KeyFilter | None:
        pattern = self.query("filter")
        if pattern is None:
            return None
        compiled = self.ctx.plugins.hook.compile_filter(pattern=pattern)
        if compiled is None:
            raise plugin_required("filter", "filter")
        return compiled

    async def put(self) -> None:
        self.require_ready()
        body = self.json_body()
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object of key/value pairs")
        if not body:
            raise BadRequest("body must hold at least one key/value pair")
        expires_at = self.expiry_for_write()
        values = {check_key(key): self.encode_value(key, value) for key, value in body.items()}
        expires = dict.fromkeys(values, expires_at) if expires_at is not None else {}
        record = await self.commit(Change(op=OP_PUT, set=values, expires=expires))
        self.send_json(orjson.dumps({"revision": record.seq, "stored": list(values)}))

    async def delete(self) -> None:
        self.require_ready()
        await self.commit(Change(op=OP_CLEAR))
        self.set_status(204)
        self.finish()


class KeyHandler(KeysBodyHandler):
    endpoint = "/keys/{id}"

    def _read(self, key: str) -> bytes:
        self.require_ready()
        check_key(key)
        entry = self.store.get(key)
        if entry is None:
            raise NotFound(f"key {key!r} not found")
        value = entry.value
        if self.ctx.reads_transformed:
            replaced = self.ctx.plugins.hook.transform_read(key=key, value=value)
            if replaced is HIDDEN:
                raise NotFound(f"key {key!r} not found")
            if replaced is not None:
                value = replaced
        tag = etag(entry)
        self.set_header("ETag", tag)
        if _etag_matches(self.request.headers.get("If-None-Match"), tag):
            self.set_status(304)
            return b""
        return value

    def get(self, key: str) -> None:
        value = self._read(key)
        if self.get_status() == 304:
            self.finish()
            return
        self.send_json(b"{" + orjson.dumps(key) + b":" + value + b"}")

    def head(self, key: str) -> None:
        self._read(key)
        self.set_header("Content-Type", JSON_TYPE)
        self.finish()

    async def delete(self, key: str) -> None:
        self.require_ready()
        check_key(key)
        await self.commit(Change(op=OP_DELETE, keys=(key,)))
        self.set_status(204)
        self.finish()


def _etag_matches(header: str | None, tag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == tag for candidate in header.split(","))
