"""kvd.handlers.framing: requests Tornado cannot parse get kvd's JSON errors and change nothing.

Raw bytes over one connection, as a client with a broken HTTP stack would
send them: first on a new connection (Tornado from the start), then after a
plain PUT that kvd's own connection answered (handed over midway), and with
kvd serve's wire switched off (Tornado accepts the connection itself).
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from test_wire import Connection, put

HEAD = b"PUT /keys/c HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"

MALFORMED = {
    "two content-lengths": HEAD + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n123",
    "content-length not a number": HEAD + b"Content-Length: abc\r\n\r\n123",
    "negative content-length": HEAD + b"Content-Length: -1\r\n\r\n",
    "chunked and content-length": HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n1\r\n1\r\n0\r\n\r\n",
    "unknown transfer-encoding": HEAD + b"Transfer-Encoding: gzip\r\n\r\n",
    "chunk size not hex": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n123\r\n0\r\n\r\n",
    "chunk-size line too long": HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 100 + b"1\r\n",
    "folded header": b"GET /keys/c HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n",
    "header without colon": b"GET /keys/c HTTP/1.1\r\nNoColon\r\n\r\n",
    "garbage request line": b"GARBAGE\r\n\r\n",
    "request line without version": b"GET /keys/c\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "HTTP/1.1 read without Host": b"GET /keys/c HTTP/1.1\r\n\r\n",
    "HTTP/1.1 write without Host": HEAD.replace(b"Host: t\r\n", b"") + b"Content-Length: 1\r\n\r\n1",
    "two Hosts": b"GET /keys/c HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n",
}
OVERSIZED_HEAD = b"GET /keys/c HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
# Heads between one and two of tornado's 64 KiB reads: the wire hands them over whole,
# with nothing left on the socket for tornado to wait for.
OVERSIZED_HEADS = {
    "200 KB header": OVERSIZED_HEAD,
    **{f"{size // 1000} KB request line": b"GET /keys/" + b"a" * size + b" HTTP/1.1\r\nHost: t\r\n\r\n"
       for size in (66_000, 70_000, 100_000)},
    "70 KB unfinished head": b"GET /keys/c HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000,
    # whole, in one write: a plain request but for its size
    **{f"{size // 1000} KB header": b"GET /keys/c HTTP/1.1\r\nHost: t\r\nX: " + b"a" * size + b"\r\n\r\n"
       for size in (66_000, 100_000)},
    "PUT with a 70 KB header": put("c", 1, "X: " + "a" * 70_000 + "\r\n"),
}


def check_refused(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == ("bad_request" if expected == 400 else "header_too_large")
    assert error["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("after_a_plain_put", [False, True], ids=["first", "handed-over"])
async def test_a_malformed_request_gets_a_json_400_and_stores_nothing(
    http_server, base_url, harness, raw, after_a_plain_put
):
    conn = await Connection.open(base_url)
    if after_a_plain_put:  # answered on kvd's own connection, then handed to tornado
        await conn.send(put("w", 1))
        assert (await conn.response())[0] == 201
    await conn.send(raw)
    check_refused(*await conn.response(), expected=400)
    assert await conn.closed_by_server()
    assert harness.store.get("c") is None
    conn.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("raw", OVERSIZED_HEADS.values(), ids=OVERSIZED_HEADS.keys())
@pytest.mark.parametrize("after_a_plain_put", [False, True], ids=["first", "handed-over"])
async def test_an_oversized_head_gets_a_json_431(http_server, base_url, harness, raw, after_a_plain_put):
    conn = await Connection.open(base_url)
    if after_a_plain_put:
        await conn.send(put("w", 1))
        assert (await conn.response())[0] == 201
    await conn.send(raw)
    check_refused(*await conn.response(), expected=431)
    assert harness.store.get("c") is None
    conn.close()


def chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                    for part in (body[at:at + size] for at in range(0, len(body), size))) + b"0\r\n\r\n"


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("chunk_size", [1 << 30, 65536, 1000], ids=["one chunk", "64 KiB chunks", "1 KB chunks"])
async def test_a_chunked_body_over_the_limit_gets_a_json_413_and_stores_nothing(
    http_server, base_url, harness, chunk_size
):
    """As for a Content-Length over the limit (tornado's own limit answered a bare 400)."""
    limit = harness.ctx.config.server.max_body_bytes
    body = b'{"c": "' + b"x" * limit + b'"}'
    conn = await Connection.open(base_url)
    await conn.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, chunk_size))
    status, headers, answer = await conn.response()
    assert status == 413 and json.loads(answer)["error"]["code"] == "payload_too_large", answer
    assert f"larger than {limit} bytes" in json.loads(answer)["error"]["message"]
    assert headers["connection"] == "close"
    assert harness.store.get("c") is None
    conn.close()
    metrics = await Connection.open(base_url)
    await metrics.send(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    text = (await metrics.response())[2].decode()
    assert 'request_count_total{endpoint="/keys/{id}",method="PUT",status="413"} 1.0' in text
    metrics.close()


@pytest.mark.gen_test
async def test_a_chunked_body_within_the_limit_is_stored(http_server, base_url, harness):
    conn = await Connection.open(base_url)
    await conn.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b'{"n": [1, 2, 3]}', 5))
    status, _, answer = await conn.response()
    assert status == 201 and json.loads(answer) == {"c": {"n": [1, 2, 3]}}
    conn.close()


@pytest.mark.gen_test
async def test_a_well_formed_error_still_comes_from_the_handler(http_server, base_url):
    """Only tornado's bare answer is replaced: a handler's own 400 keeps its message."""
    conn = await Connection.open(base_url)
    await conn.send(HEAD + b"Content-Length: 5\r\n\r\n{bad}")
    status, headers, body = await conn.response()
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    assert headers.get("connection") != "close"
    conn.close()


def exchange(sock: socket.socket, raw: bytes) -> bytes:
    """Send ``raw`` on a connected socket (plain or TLS), read until the server closes, close."""
    with sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize("fast_wire", ["true", "false"])
def test_kvd_serve_answers_malformed_requests_in_json_with_the_wire_on_or_off(
    kvd_process, tmp_path, fast_wire
):
    server = kvd_process(tmp_path / "data", env={"KVD_SERVER_FAST_WIRE": fast_wire})
    for raw, status in [(MALFORMED["two content-lengths"], 400), (OVERSIZED_HEAD, 431)]:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        head, _, body = exchange(sock, raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), head
        assert "error" in json.loads(body)
    assert server.get_key("c").status == 404


@pytest.mark.gen_test
async def test_a_client_still_sending_a_refused_body_reads_the_whole_413(http_server, base_url, harness):
    """The refusal is not lost to a reset: kvd drains what the client still sends before it
    closes (a close with unread bytes makes the kernel reset the connection)."""
    limit = harness.ctx.config.server.max_body_bytes
    conn = await Connection.open(base_url)
    await conn.send(b"PUT /keys/big HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {limit + 1}\r\n\r\n".encode() + b"[" + b"1," * (limit // 2))
    status, headers, body = await conn.response()
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert headers["connection"] == "close"
    assert await conn.closed_by_server()
    assert harness.store.get("big") is None
    conn.close()


@pytest.mark.gen_test
async def test_refused_connections_linger_until_the_client_closes_and_no_longer(http_server, base_url):
    from kvd.handlers import framing

    conn = await Connection.open(base_url)
    await conn.send(MALFORMED["two content-lengths"])
    check_refused(*await conn.response(), expected=400)
    assert await conn.closed_by_server()
    assert len(framing._lingering) == 1  # draining what the client might still send
    conn.close()
    for _ in range(100):
        if not framing._lingering:
            break
        await asyncio.sleep(0.01)
    assert not framing._lingering  # gone as soon as the client closed, well before LINGER_SECONDS


@pytest.mark.gen_test
async def test_past_max_lingering_a_refused_connection_is_closed_at_once(http_server, base_url, monkeypatch):
    from kvd.handlers import framing

    monkeypatch.setattr(framing, "MAX_LINGERING", 0)
    conn = await Connection.open(base_url)
    await conn.send(MALFORMED["folded header"])
    check_refused(*await conn.response(), expected=400)
    assert not framing._lingering
    conn.close()
