"""The key in /keys/{key} is the path's bytes, percent-decoded, read as UTF-8, on every route.

HTTP clients should percent-encode a non-ASCII key, but many send its UTF-8
bytes as they are (curl does, given ``/keys/café``). Tornado reads the
request line as Latin-1, so before the fix a raw ``é`` reached KeyHandler as
``Ã©``: GET on kvd's own connection found ``café`` while HEAD and DELETE of
the same URL did not, and a raw Latin-1 ``\\xe9`` (not UTF-8 at all) deleted
``café``. Raw bytes over one connection, as such a client sends them: on
kvd's own connection (the wire), after it handed the connection to Tornado
(kvd.handlers.fast), and with the fast paths off (KeyHandler alone).
"""

from __future__ import annotations

import json

import pytest
from test_wire import Connection

KEY = "café/ключ"
RAW = KEY.encode()  # UTF-8, not percent-encoded
ESCAPED = b"caf%C3%A9%2F%D0%BA%D0%BB%D1%8E%D1%87"  # the same key, percent-encoded
ROUTES = ["wire", "handed-over", "handler"]


def request(method: str, target: bytes, body: bytes | None = None) -> bytes:
    head = method.encode() + b" /keys/" + target + b" HTTP/1.1\r\nHost: t\r\n"
    if body is None:
        return head + b"\r\n"
    return head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def open_on(route: str, base_url: str, app) -> Connection:  # noqa: ANN001
    app.fast_paths = route != "handler"
    conn = await Connection.open(base_url)
    if route == "handed-over":  # a read on the wire, then a listing: Tornado's from then on
        await conn.send(request("GET", b"absent") + b"GET /keys?limit=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert [(await conn.response())[0] for _ in range(2)] == [404, 200]
    return conn


@pytest.mark.gen_test
@pytest.mark.parametrize("route", ROUTES)
async def test_a_key_sent_as_raw_utf8_is_the_same_key_for_every_method(
    http_server, base_url, app, harness, route
):
    conn = await open_on(route, base_url, app)
    await conn.send(request("PUT", RAW, b"1"))
    assert (await conn.response())[0] == 201
    assert harness.store.get(KEY).value == b"1"
    for target in (RAW, ESCAPED):
        await conn.send(request("GET", target))
        status, _, body = await conn.response()
        assert (status, json.loads(body)) == (200, {KEY: 1})
        await conn.send(request("HEAD", target))
        assert (await conn.response(head_only=True))[0] == 200
    await conn.send(request("PUT", ESCAPED, b"2"))
    assert (await conn.response())[0] == 200
    await conn.send(request("DELETE", RAW))
    assert (await conn.response())[0] == 204
    assert harness.store.get(KEY) is None
    assert harness.store.get(RAW.decode("latin-1")) is None  # nothing stored under the misreading
    conn.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
@pytest.mark.parametrize("target", [b"caf\xe9", b"caf%E9", b"caf\xc3"], ids=["raw-latin-1", "escaped-latin-1", "cut-utf-8"])
async def test_a_key_that_is_not_utf8_gets_a_json_400_and_changes_nothing(
    http_server, base_url, app, harness, route, method, target
):
    conn = await open_on(route, base_url, app)
    await conn.send(request("PUT", b"caf%C3%A9", b"1"))  # the key a Latin-1 reading would hit
    assert (await conn.response())[0] in (200, 201)
    revision = harness.store.get("café").revision
    await conn.send(request(method, target, b"2" if method == "PUT" else None))
    status, headers, body = await conn.response(head_only=method == "HEAD")
    assert status == 400
    assert headers["content-type"] == "application/json"
    if method != "HEAD":
        error = json.loads(body)["error"]
        assert error["code"] == "bad_request" and "UTF-8" in error["message"], error
    assert harness.store.get("café").revision == revision
    assert list(harness.store.committed_entries()) == ["café"]
    conn.close()
