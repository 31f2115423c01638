"""Limits and hostile clients: slow senders, huge heads, many keys, TLS, nothing secret logged."""

from __future__ import annotations

import asyncio
import errno
import http.client
import json
import logging
import os
import resource
import socket
import ssl
import subprocess
import time

import pytest
from test_framing import exchange

from kvd.handlers.accept import add_accept_handler


@pytest.fixture
def plugin_settings():  # noqa: ANN201
    return {"server.max_keys_per_request": 3}


@pytest.mark.gen_test
async def test_too_many_keys_in_one_put_is_413_and_writes_nothing(http_client, base_url, harness):
    async def put(body: dict) -> int:
        response = await http_client.fetch(base_url + "/keys", method="PUT", body=json.dumps(body),
                                           headers={"Content-Type": "application/json"},
                                           raise_error=False)
        return response.code

    assert await put({"a": 1, "b": 2, "c": 3, "d": 4}) == 413
    assert harness.journal_lines() == []
    assert await put({"a": 1, "b": 2, "c": 3}) == 200


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Send ``trickle`` a byte at a time until the server hangs up; how long that took."""
    started = time.monotonic()
    sock.settimeout(0.2)
    position = 0
    while time.monotonic() - started < seconds:
        try:
            if position < len(trickle):
                sock.sendall(trickle[position : position + 1])
                position += 1
            data = sock.recv(4096)
            if data == b"" or data.startswith(b"HTTP/1.1 4"):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return None


@pytest.mark.slow
def test_slow_clients_are_cut_off_and_others_keep_being_served(kvd_process):
    server = kvd_process(env={"KVD_SERVER_IDLE_TIMEOUT": "1", "KVD_SERVER_BODY_TIMEOUT": "1"})
    # slowloris: headers that never end, one byte every 0.2 s
    head = socket.create_connection(("127.0.0.1", server.port))
    head.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    took = closed_within(head, 10, trickle=b"X-Slow: " + b"a" * 200)
    assert took is not None and took < 5, took
    # a body that never arrives in full
    body = socket.create_connection(("127.0.0.1", server.port))
    body.sendall(b"PUT /keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"a\":")
    took = closed_within(body, 10)
    assert took is not None and took < 5, took
    assert server.request("GET", "/healthz").status == 200
    assert server.request("GET", "/keys").json() == {}  # the partial body wrote nothing


def test_a_body_slow_but_in_time_is_taken_on_both_write_paths(kvd_process):
    """The body deadline (kvd.handlers.deadline) closes only late bodies: a body that
    arrives in pieces within it is written, on the fast PUT path and through the handlers."""
    server = kvd_process(env={"KVD_SERVER_BODY_TIMEOUT": "3"})
    for path, body, key in ((b"/keys/slow", b'"value"', "slow"), (b"/keys", b'{"other":1}', "other")):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"PUT " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:3])
        time.sleep(1.0)
        sock.sendall(body[3:])
        answer = sock.recv(4096)
        sock.close()
        assert answer.startswith((b"HTTP/1.1 201", b"HTTP/1.1 200")), answer
        assert server.get_key(key).status == 200


@pytest.mark.slow
def test_oversized_request_head_is_refused_and_the_server_carries_on(kvd_process):
    server = kvd_process(env={"KVD_SERVER_MAX_HEADER_BYTES": "4096"})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/healthz", headers={"X-Big": "a" * 8192})
    response = connection.getresponse()
    assert response.status == 431 and json.loads(response.read())["error"]["code"] == "header_too_large"
    connection.close()
    assert server.request("GET", "/healthz").status == 200


@pytest.mark.slow
def test_tls_serves_https_with_the_configured_certificate(kvd_process, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    config = tmp_path / "tls.toml"
    config.write_text(f'[server]\ncertfile = "{cert}"\nkeyfile = "{key}"\n')
    server = kvd_process(args=["--config", str(config)], wait_ready=False)
    assert "listening on https://" in server.log()
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 30
    while True:
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        response.read()
        connection.close()
        if response.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status == 200
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    connection.request("PUT", "/keys/k", body=b'"v"', headers={"Content-Type": "application/json"})
    assert connection.getresponse().status == 201
    connection.close()
    for raw, status in [  # what Tornado cannot parse is answered in JSON over TLS too
        (b"PUT /keys/k HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n1", 400),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
    ]:
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                                  server_hostname="127.0.0.1")
        received = exchange(tls, raw)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status) and "error" in json.loads(body), received
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)):
        server.request("GET", "/healthz")  # plain HTTP to the TLS port gets no answer


@pytest.mark.slow
def test_values_are_never_logged(kvd_process):
    server = kvd_process(args=["--access-log", "--log-level", "debug"])
    secret_value = "s3cr3t-value-6b1f"
    secret_key = "s3cr3t-key-93ad"
    assert server.request("PUT", "/keys", {secret_key: secret_value}).status == 200
    assert server.request("GET", f"/keys/{secret_key}").status == 200
    assert server.request("PUT", "/keys", b"{bad", headers={"Content-Type": "text/plain"}).status == 415
    server.kill(15)
    log = server.log()
    assert "PUT /keys 200" in log  # the access log is on
    assert secret_value not in log and secret_key not in log


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used (/proc/PID/stat utime + stime)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("fast_wire", ["true", "false"])
def test_at_the_open_files_limit_the_server_waits_quietly_and_accepts_again(kvd_process, fast_wire):
    """EMFILE from accept() once spun the loop at 100% CPU with a traceback per try
    (tornado's accept handler): now accepting pauses, with one warning, until a
    descriptor frees up."""
    server = kvd_process(env={"KVD_SERVER_FAST_WIRE": fast_wire}, preexec=limit_open_files)
    assert server.process is not None
    pid = server.process.pid
    assert server.request("PUT", "/keys/k", 1).status == 201
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    deadline = time.monotonic() + 10
    while "too many open files" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = cpu_seconds(pid)
    time.sleep(3)
    used = cpu_seconds(pid) - started
    log = server.log()
    assert used < 0.5, f"{used:.2f} s of CPU in 3 s at the limit"
    assert log.count("too many open files (limit 64)") == 1 and "Traceback" not in log, log
    assert len(log) < 2000
    for sock in idle:
        sock.close()
    assert server.request("GET", "/healthz").status == 200
    assert server.get_key("k").json() == {"k": 1}
    assert "accepting connections again after" in server.log()


class OutOfFiles(socket.socket):
    """A listening socket whose accept() fails with EMFILE while ``failing``."""

    failing = True

    def accept(self) -> tuple[socket.socket, object]:
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


@pytest.mark.gen_test(timeout=10)
async def test_accepting_pauses_on_emfile_resumes_and_stops_cleanly_while_paused(caplog):
    caplog.set_level(logging.INFO, "kvd.app")
    listener = OutOfFiles()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    accepted: list[socket.socket] = []
    stop = add_accept_handler(listener, lambda connection, _: accepted.append(connection))
    client = socket.create_connection(listener.getsockname())
    await asyncio.sleep(0.5)  # tries at 0, 0.1, 0.3 s: paused in between
    assert accepted == [] and caplog.text.count("not accepting connections") == 1
    listener.failing = False
    await asyncio.sleep(1.2)
    assert len(accepted) == 1 and "accepting connections again after" in caplog.text
    listener.failing = True
    other = socket.create_connection(listener.getsockname())
    await asyncio.sleep(0.05)  # paused again (the warning is not repeated within a minute)
    stop()
    listener.failing = False
    await asyncio.sleep(0.3)  # the retry that was due must not watch the socket again
    assert len(accepted) == 1 and caplog.text.count("not accepting connections") == 1
    for sock in (client, other, listener, *accepted):
        sock.close()
