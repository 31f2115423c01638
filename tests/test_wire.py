"""kvd.handlers.wire: hot requests answered on kvd's own connections, the rest by tornado.

Raw bytes over one connection, so pipelining, the hand-over to tornado
mid-connection and framing oddities are seen as a client sees them.
test_fast_path.py compares the wire's answers with KeyHandler's.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from urllib.parse import urlsplit

import pytest
from conftest import build_harness

from kvd.handlers.wire import HotRequest, parse_hot_request, starts_hot


class Connection:
    """One client connection: send raw bytes, read whole responses in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, base_url: str) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(base_url).port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if head_only or status in (204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    return status, headers, body
                body += chunk[:-2]
        if "content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        return status, headers, await self.reader.read()  # until the server closes

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


def put(key: str, value: object, extra: str = "") -> bytes:
    body = json.dumps(value).encode()
    return (f"PUT /keys/{key} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


@pytest.mark.gen_test
async def test_pipelined_hot_requests_are_answered_in_order(http_server, base_url, harness):
    conn = await Connection.open(base_url)
    await conn.send(put("a", 1) + get("/keys/a") + put("a", {"x": 2}) + get("/keys/a") + get("/keys/nope"))
    answers = [await conn.response() for _ in range(5)]
    assert [status for status, _, _ in answers] == [201, 200, 200, 200, 404]
    assert answers[1][2] == b'{"a":1}' and answers[3][2] == b'{"a":{"x":2}}'
    assert answers[0][1]["etag"] == '"1"' and answers[3][1]["etag"] == '"2"'
    assert json.loads(answers[4][2])["error"]["code"] == "not_found"
    assert harness.store.get("a").value == b'{"x":2}'
    conn.close()


def delete(key: str, extra: str = "") -> bytes:
    return f"DELETE /keys/{key} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


@pytest.mark.gen_test
async def test_plain_deletes_are_answered_on_the_wire_in_order(http_server, base_url, harness):
    conn = await Connection.open(base_url)
    await conn.send(put("a", 1) + delete("a") + get("/keys/a") + delete("a") + put("a", 2))
    answers = [await conn.response() for _ in range(5)]
    assert [status for status, _, _ in answers] == [201, 204, 404, 404, 201]
    deleted, absent = answers[1], answers[3]
    assert deleted[2] == b"" and "content-length" not in deleted[1]  # RFC 9110: none on a 204
    assert json.loads(absent[2]) == {"error": {"code": "not_found", "message": "key 'a' not found"}}
    assert [line["op"] for line in harness.journal_lines()] == ["put", "delete", "put"]  # no record for the 404
    assert len(http_server.kvd_wire.connections) == 1 and not http_server._connections
    conn.close()


@pytest.mark.gen_test
async def test_writes_refused_at_once_are_answered_once_each(http_server, base_url, harness, monkeypatch):
    """After a failed fsync the store refuses writes before journaling them: the answer comes
    while the wire is still handling the request, and must not make it handle that same
    request again (it did, until the recursion limit)."""
    from kvd.log import file as file_journal

    def failing_fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    conn = await Connection.open(base_url)
    await conn.send(put("a", 1))
    assert (await conn.response())[0] == 201
    monkeypatch.setattr(file_journal.os, "fdatasync", failing_fdatasync)
    await conn.send(put("b", 1))
    assert (await conn.response())[0] == 503  # the failed fsync
    await conn.send(put("c", 1) + delete("a") + get("/keys/a") + put("d", 1))
    answers = [await conn.response() for _ in range(4)]
    assert [status for status, _, _ in answers] == [503, 503, 200, 503]
    assert {json.loads(body)["error"]["code"] for status, _, body in answers if status == 503} == {"unavailable"}
    assert len(http_server.kvd_wire.connections) == 1
    conn.close()


@pytest.mark.gen_test
async def test_a_request_only_tornado_answers_hands_the_connection_over_mid_pipeline(
    http_server, base_url, harness
):
    conn = await Connection.open(base_url)
    await conn.send(put("k0", 0))
    assert (await conn.response())[0] == 201
    assert len(http_server.kvd_wire.connections) == 1 and not http_server._connections
    await conn.send(put("k1", 1) + get("/keys?filter=k1") + get("/keys/k1") + put("k2", 2))
    first, listing, read, second = [await conn.response() for _ in range(4)]
    assert (first[0], listing[0], read[0], second[0]) == (201, 200, 200, 201)
    assert json.loads(listing[2]) == {"k1": 1}
    assert read[2] == b'{"k1":1}'
    await conn.send(get("/keys/k2"))  # the same connection goes on, on tornado
    assert (await conn.response())[2] == b'{"k2":2}'
    assert not http_server.kvd_wire.connections and len(http_server._connections) == 1
    conn.close()


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("raw", "status", "stored"),
    [
        # chunked body: tornado reads it
        (b"PUT /keys/c HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n3\r\n[1]\r\n0\r\n\r\n", 201, b"[1]"),
        # HTTP/1.0
        (b"PUT /keys/c HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 1\r\n\r\n5", 201, b"5"),
        # bad JSON: KeyHandler's 400, nothing stored
        (put("c", 0).replace(b"\r\n\r\n0", b"\r\n\r\n{"), 400, None),
        # not JSON
        (put("c", 1).replace(b"application/json", b"text/plain"), 415, None),
        # a condition
        (put("c", 1, "If-Match: \"7\"\r\n"), 412, None),
        # a conditional DELETE, and one with a body (which it refuses): KeyHandler's
        (delete("c", "If-Match: \"7\"\r\n"), 412, None),
        (delete("c", "Content-Length: 2\r\nContent-Type: application/json\r\n") + b"{}", 400, None),
        # a query string
        (b"PUT /keys/c?expire_in=60 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
         b"Content-Length: 1\r\n\r\n6", 201, b"6"),
        # two Content-Lengths: tornado refuses the request
        (b"PUT /keys/c HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
         b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n77", 400, None),
        # a folded header line
        (b"PUT /keys/c HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n X-Folded: y\r\n"
         b"Content-Length: 1\r\n\r\n8", 400, None),
    ],
    ids=["chunked", "http10", "bad-json", "not-json", "if-match", "delete-if-match", "delete-with-body",
         "query", "two-lengths", "folded"],
)
async def test_what_the_wire_does_not_take_is_answered_by_tornado(
    http_server, base_url, harness, raw, status, stored
):
    conn = await Connection.open(base_url)
    await conn.send(raw)
    got, headers, body = await conn.response()
    assert got == status, body
    if status >= 400:  # malformed framing too (kvd.handlers.framing)
        assert headers["content-type"] == "application/json" and "error" in json.loads(body)
    entry = harness.store.get("c")
    assert (entry.value if entry else None) == stored
    conn.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("after_a_plain_put", [False, True], ids=["first", "handed-over"])
async def test_heads_with_bare_lf_line_ends_are_answered_by_tornado(
    http_server, base_url, harness, after_a_plain_put
):
    """Tornado takes lines ended by a bare LF; the wire waited for a CRLF CRLF that never came."""
    conn = await Connection.open(base_url)
    if after_a_plain_put:
        await conn.send(put("a", 1))
        assert (await conn.response())[0] == 201
    await conn.send(b"GET /keys/a HTTP/1.1\nHost: t\n\n"
                    b"GET /keys/b HTTP/1.1\r\nHost: t\r\nConnection: close\n\n")
    (status, _, body), (missing, headers, error) = [await conn.response() for _ in range(2)]
    if after_a_plain_put:
        assert (status, body) == (200, b'{"a":1}')
    else:
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert missing == 404 and json.loads(error)["error"]["code"] == "not_found"
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert await conn.closed_by_server()
    conn.close()


@pytest.mark.gen_test
async def test_a_body_that_arrives_in_pieces_is_stored_whole(http_server, base_url, harness):
    raw = put("slow", {"text": "x" * 5000})
    conn = await Connection.open(base_url)
    await conn.send(raw[:40])
    await asyncio.sleep(0.05)
    await conn.send(raw[40:100])
    await asyncio.sleep(0.05)
    await conn.send(raw[100:])
    status, _, body = await conn.response()
    assert status == 201 and json.loads(body) == {"slow": {"text": "x" * 5000}}
    await conn.send(get("/keys/slow"))
    assert (await conn.response())[0] == 200
    conn.close()


@pytest.mark.gen_test
async def test_expect_100_continue_is_honoured(http_server, base_url, harness):
    conn = await Connection.open(base_url)
    head, body = put("e", [1, 2]).split(b"\r\n\r\n", 1)
    await conn.send(head + b"\r\nExpect: 100-continue\r\n\r\n")
    status, _, _ = await conn.response(head_only=True)
    assert status == 100
    await conn.send(body)
    assert (await conn.response())[0] == 201
    assert harness.store.get("e").value == b"[1,2]"
    conn.close()


@pytest.mark.gen_test
async def test_connection_close_is_honoured_on_a_hot_request(http_server, base_url, harness):
    conn = await Connection.open(base_url)
    await conn.send(put("z", 1, "Connection: close\r\n"))
    status, headers, _ = await conn.response()
    assert status == 201 and headers.get("connection") == "close"
    assert await conn.closed_by_server()


@pytest.mark.gen_test
async def test_a_declared_body_over_the_limit_gets_413_without_being_read(http_server, base_url, harness):
    limit = harness.ctx.config.server.max_body_bytes
    conn = await Connection.open(base_url)
    await conn.send(b"PUT /keys/big HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {limit + 1}\r\n\r\n".encode() + b"[")
    status, _, body = await conn.response()
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert harness.store.get("big") is None


@pytest.mark.gen_test(timeout=20)
async def test_idle_connections_are_closed_after_idle_timeout(served, tmp_path):
    url = served(build_harness(tmp_path / "idle", **{"server.idle_timeout": 0.3}))
    conn = await Connection.open(url)
    await conn.send(put("i", 1))
    assert (await conn.response())[0] == 201
    started = asyncio.get_running_loop().time()
    assert await conn.closed_by_server()
    assert asyncio.get_running_loop().time() - started < 5


@pytest.mark.gen_test(timeout=20)
async def test_a_half_sent_head_counts_against_idle_timeout(served, tmp_path):
    url = served(build_harness(tmp_path / "half", **{"server.idle_timeout": 0.3}))
    conn = await Connection.open(url)
    await conn.send(b"GET /keys/x HTTP/1.1\r\nHo")
    assert await conn.closed_by_server()


def test_parse_hot_request_takes_only_whole_plain_requests():
    limit = 1 << 20
    whole = bytearray(put("k", 1))
    parsed = parse_hot_request(whole, limit, limit)
    assert isinstance(parsed, HotRequest)
    assert (parsed.method, parsed.path, parsed.body, parsed.size) == (b"PUT", b"k", b"1", len(whole))
    assert parse_hot_request(bytearray(b"GET /keys/k HTTP/1.1\r\nHost"), limit, limit) is None  # head unfinished
    for bare_lf_end in (b"\n\n", b"\r\n\n", b"\n\r\n"):  # tornado's head ends too
        head = bytearray(b"GET /keys/k HTTP/1.1\nHost: t" + bare_lf_end)
        assert parse_hot_request(head, limit, limit) is False
    assert parse_hot_request(whole[:-1], limit, limit) is False  # body unfinished: tornado reads it
    for other in (
        get("/keys/"), get("/keys"), get("/healthz"), get("/keys/k?x=1"),
        b"HEAD /keys/k HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", b"GET /keys/k HTTP/1.0\r\n\r\n",
        b"GET /keys/k HTTP/1.1\nHost: t\r\n\r\n", get("/keys/k", "Connection: upgrade\r\n"),
        get("/keys/k", "Content-Length: 3\r\n") + b"abc", put("k", 1, "Expect: 100-continue\r\n"),
        put("k", 1).replace(b"Content-Length: 1", b"Content-Length: +1"),
        delete("k", "Content-Length: 2\r\n") + b"{}", b"DELETE /keys HTTP/1.1\r\n\r\n",
        b"GET /keys/k HTTP/1.1\r\n\r\n", get("/keys/k", "Host: u\r\n"),  # no Host, two: tornado's 400
    ):
        assert parse_hot_request(bytearray(other), limit, limit) is False, other
    assert parse_hot_request(bytearray(put("k", 1)), 0, limit) is False  # over the body limit
    head = get("/keys/k")
    assert parse_hot_request(bytearray(head), limit, len(head))  # a head of max_head bytes, its end too
    assert parse_hot_request(bytearray(head), limit, len(head) - 1) is False  # tornado's 431
    parsed = parse_hot_request(bytearray(b"HEAD /keys/k HTTP/1.1\r\nHost: t\r\n\r\n"), limit, limit)
    assert isinstance(parsed, HotRequest) and parsed.method == b"HEAD"
    parsed = parse_hot_request(bytearray(delete("k%20l")), limit, limit)
    assert isinstance(parsed, HotRequest) and (parsed.method, parsed.path, parsed.body) == (b"DELETE", b"k%20l", b"")


@pytest.mark.parametrize("fast_wire", ["true", "false"])
def test_kvd_serve_answers_the_same_with_the_wire_on_or_off(kvd_process, tmp_path, fast_wire):
    server = kvd_process(tmp_path / "data", env={"KVD_SERVER_FAST_WIRE": fast_wire})
    assert ("tornado serves every request" in server.log()) is (fast_wire == "false")
    assert server.request("PUT", "/keys/w", {"v": 1}).status == 201
    assert server.get_key("w").body == b'{"w":{"v":1}}'
    assert server.get_key("absent").status == 404
    assert server.request("GET", "/keys?filter=w").status == 200


def test_a_connection_is_judged_by_its_first_request():
    limit = 1 << 20
    assert starts_hot(put("k", 1), limit, limit) and starts_hot(get("/keys/k"), limit, limit)
    assert starts_hot(b"GET /ke", limit, limit) and starts_hot(b"PUT /keys/k HTTP/1.1\r\nHost", limit, limit)
    assert not starts_hot(get("/keys?filter=k*"), limit, limit)
    assert not starts_hot(b"GET /keys/k?consistent=1 HTT", limit, limit)
    assert not starts_hot(put("k", 1, 'If-Match: "1"\r\n'), limit, limit)
    assert not starts_hot(get("/metrics"), limit, limit)
    assert not starts_hot(b"DELETE /keys HTTP/1.1\r\n", limit, limit)
    assert starts_hot(b"DELETE /keys/k HTTP/1.1\r\nHost: t\r\n\r\n", limit, limit)
    assert not starts_hot(b'DELETE /keys/k HTTP/1.1\r\nIf-Match: "1"\r\n\r\n', limit, limit)


@pytest.mark.slow
def test_sigkill_loses_no_write_the_wire_acknowledged(kvd_process, tmp_path):
    """Keep-alive clients that only ever send plain PUTs and DELETEs stay on the wire
    throughout; a SIGKILL mid-stream loses none of the writes it answered."""
    import http.client
    import threading

    data_dir = tmp_path / "data"
    server = kvd_process(data_dir)
    acked: dict[str, int | None] = {}  # the value each key must hold (None: deleted)
    in_flight: dict[str, int | None] = {}  # sent, unanswered at the kill: done or not
    deletes_acked: list[bool] = []
    stop = threading.Event()

    def writer(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for n in range(100_000):
            key = f"w{number}-{n % 50}"
            deleting = (n // 50) % 2 == 1  # 50 keys written, then the same 50 deleted, ...
            in_flight[key] = None if deleting else n
            try:
                if deleting:
                    connection.request("DELETE", f"/keys/{key}")
                else:
                    connection.request("PUT", f"/keys/{key}", body=str(n),
                                       headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                return  # killed: this write was not acknowledged
            assert response.status == 204 if deleting else response.status in (200, 201)
            acked[key] = in_flight[key]
            deletes_acked.append(deleting)
            if stop.is_set():
                return

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    while deletes_acked.count(True) < 100:  # deletes acknowledged too, not just PUTs
        time.sleep(0.05)
    server.kill(signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
    assert "tornado serves every request" not in server.log()
    restarted = kvd_process(data_dir)
    missing = {}
    for key, n in acked.items():
        stored = json.loads(restarted.get_key(key).body).get(key)  # None if lost
        if stored not in (n, in_flight[key]):
            missing[key] = (n, stored)
    assert not missing, missing


# --- clients that do not read their answers ------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def tcp_state(sock: socket.socket) -> int:
    """The kernel's state of ``sock`` (TCP_INFO's first byte): 1 established, 7 closed."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("tail", [b"", get("/healthz") + get("/keys/big")], ids=["hot", "then-tornado"])
def test_a_client_that_pipelines_reads_and_reads_nothing_holds_little_memory_and_is_cut_off(
    kvd_process, tail
):
    """A 35 KB pipeline of reads of a 900 KB value once queued an answer per request
    (850 MiB) and held it until the client left. The wire answers no further than the
    transport's high-water mark, and aborts the connection once its client has read
    nothing for idle_timeout (a graceful close would wait for it forever)."""
    server = kvd_process(env={"KVD_SERVER_IDLE_TIMEOUT": "2"})
    value = "x" * 900_000
    assert server.request("PUT", "/keys/big", value).status == 201
    assert server.process is not None
    pid = server.process.pid
    before = rss_bytes(pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(5)
    sock.sendall(get("/keys/big") * 1000 + tail)
    started = time.monotonic()
    time.sleep(1)
    held = rss_bytes(pid) - before
    assert tcp_state(sock) == 1  # not cut off before idle_timeout
    assert held < 64 << 20, f"{held >> 20} MiB held for one connection"
    while tcp_state(sock) == 1 and time.monotonic() - started < 10:
        time.sleep(0.1)
    took = time.monotonic() - started
    assert tcp_state(sock) != 1 and 2 <= took < 6, took
    sock.close()
    response = server.get_key("big")
    assert response.status == 200 and response.json() == {"big": value}
    assert rss_bytes(pid) - before < 64 << 20


@pytest.mark.gen_test(timeout=30)
async def test_a_pipeline_whose_answers_outgrow_the_buffers_is_answered_whole_and_in_order(
    http_server, base_url, monkeypatch
):
    """The client reads only once everything is sent: the wire stops answering at the
    transport's high-water mark, answers on as the client reads, then hands the rest to
    tornado, which answers after the wire's last answer."""
    from kvd.handlers import wire

    pauses = []
    pause_writing = wire.WireConnection.pause_writing

    def counted(self: wire.WireConnection) -> None:
        pauses.append(len(self.buffer))
        pause_writing(self)

    monkeypatch.setattr(wire.WireConnection, "pause_writing", counted)
    values = {f"v{number}": str(number) * 200_000 for number in range(3)}
    conn = await Connection.open(base_url)
    for key, value in values.items():
        await conn.send(put(key, value))
        assert (await conn.response())[0] == 201
    keys = [f"v{number % 3}" for number in range(60)]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", urlsplit(base_url).port))
    reader, writer = await asyncio.open_connection(sock=sock)
    slow = Connection(reader, writer)
    await slow.send(b"".join(get(f"/keys/{key}") for key in keys) + get("/healthz") + get("/keys/v0"))
    await asyncio.sleep(0.2)  # the wire answers what the buffers take, then waits
    assert pauses, "the transport never held the answers back: the test tests nothing"
    queued = [connection.transport.get_write_buffer_size() for connection in http_server.kvd_wire.connections
              if connection.transport is not None]
    assert max(queued) < wire.WRITE_HIGH + 2 * 200_000, queued  # not 60 answers queued
    for key in keys:
        status, _, body = await slow.response()
        assert status == 200 and json.loads(body) == {key: values[key]}
    status, _, body = await slow.response()
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert (await slow.response())[2] == json.dumps({"v0": values["v0"]}, separators=(",", ":")).encode()
    slow.close()
    conn.close()
