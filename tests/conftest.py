"""Shared fixtures: an in-process app for handler tests, real processes for durability.

Every server binds port 0; nothing here uses a fixed port.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from tornado.httputil import HTTPHeaders

from kvd.app import AppContext
from kvd.config import load_config
from kvd.handlers import make_app
from kvd.handlers.framing import KvdHTTPServer, stop_lingering
from kvd.handlers.wire import Wire
from kvd.log.file import FileJournal
from kvd.server import build_context, mark_ready
from kvd.store import Store

REPO = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python bench/<script> ARGS`` from the repository, as a reader would run it; fails the
    test, with the tail of its output, unless it exits 0."""
    run = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


def load_bench_module(name: str) -> Any:
    """``bench/<name>.py``, loaded by path as ``bench_<name>``: putting bench/ on sys.path
    would let bench/nats.py shadow the nats package for every later test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
LISTENING = re.compile(rb"listening on https?://([^:/\s]+|\[[^\]]+\]):(\d+)")


# --- in-process app (pytest-tornado's `app` fixture) -------------------------


@dataclass
class Harness:
    """The pieces of an in-process server, so tests can look behind the API."""

    ctx: AppContext
    data_dir: Path

    @property
    def store(self) -> Store:
        return self.ctx.store

    @property
    def journal(self) -> FileJournal:
        return self.ctx.journal  # type: ignore[return-value]

    def journal_lines(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        for path in sorted(self.data_dir.glob("[0-9]*.jsonl")):
            lines += [json.loads(line) for line in path.read_bytes().splitlines() if line]
        return lines


def build_harness(data_dir: Path, **overrides: Any) -> Harness:
    """An in-process store wired exactly as ``kvd serve`` wires it, replayed and ready.

    Periodic tasks start only when an IOLoop runs (pytest-tornado tests).
    """
    # No sealer processes unless a test asks: with small segments every roll would
    # start one (tests/test_seal.py covers them).
    settings: dict[str, Any] = {"journal.data_dir": str(data_dir), "journal.seal_segments": False}
    settings.update(overrides)
    config = load_config(None, environ={}, overrides=settings)
    ctx = build_context(config)
    ctx.journal.replay()  # type: ignore[union-attr]
    mark_ready(ctx)
    return Harness(ctx=ctx, data_dir=data_dir)


@pytest.fixture
def served() -> Iterator[Any]:
    """Factory: ``url = served(harness)`` serves another in-process app on a free port.

    ``fast_paths=False`` serves it without kvd's fast read/write paths.
    """
    from tornado.testing import bind_unused_port

    servers: list[tuple[KvdHTTPServer, Wire, Harness]] = []

    def serve(harness: Harness, fast_paths: bool = True) -> str:
        sock, port = bind_unused_port()
        app = make_app(harness.ctx)
        app.fast_paths = fast_paths
        server = KvdHTTPServer(app)
        wire = Wire(app, server)
        wire.listen([sock])
        servers.append((server, wire, harness))
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, wire, harness in servers:
        wire.stop()
        wire.close_all_connections()
        server.stop()
        stop_lingering()  # what server.close_all_connections() would do, without a loop to run it
        harness.ctx.stop_periodic_tasks()
        harness.journal.close_sync()


@pytest.fixture
def http_server(request: pytest.FixtureRequest, io_loop: Any, _unused_port: Any) -> Any:
    """pytest-tornado's server, with kvd's own connections in front as ``kvd serve`` has
    them (kvd.handlers.wire): tornado gets what they hand over."""
    app = request.getfixturevalue(request.config.option.app_fixture)
    server = KvdHTTPServer(app)
    wire = Wire(app, server)
    wire.listen([_unused_port[0]])
    server.kvd_wire = wire  # type: ignore[attr-defined]  # for tests that look at its connections
    yield server
    wire.stop()
    wire.close_all_connections()
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=request.config.option.async_test_timeout)


@pytest.fixture
def api(http_client: Any, base_url: str) -> Any:
    """``await api(method, path, body=None, headers=None, raw=None)`` against the in-process app.

    ``body`` is sent as JSON, ``raw`` as given; either way with a JSON
    Content-Type unless ``headers`` say otherwise. Never raises on 4xx/5xx.
    """

    async def send(method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None, raw: bytes | None = None) -> Any:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        all_headers = {"Content-Type": "application/json"} if payload is not None else {}
        all_headers.update(headers or {})
        if payload is None and method in ("PUT", "POST", "PATCH"):
            payload = b""  # tornado's client wants a body for these methods
        return await http_client.fetch(
            base_url + path, method=method, body=payload, headers=all_headers,
            raise_error=False, allow_nonstandard_methods=True,
        )

    return send


@pytest.fixture
def plugin_settings() -> dict[str, Any]:
    """Override in a test module to change the in-process app's settings."""
    return {}


@pytest.fixture
def harness(tmp_path: Path, plugin_settings: dict[str, Any], io_loop: Any) -> Iterator[Harness]:
    """Built on pytest-tornado's ``io_loop``, so periodic tasks run on the test's loop."""
    built = build_harness(tmp_path / "data", **plugin_settings)
    yield built
    built.ctx.stop_periodic_tasks()
    built.journal.close_sync()


@pytest.fixture
def app(harness: Harness):  # noqa: ANN201 - pytest-tornado's fixture name
    return make_app(harness.ctx)


# --- real server processes ---------------------------------------------------


@dataclass
class Response:
    status: int
    headers: HTTPHeaders
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class KvdProcess:
    """A ``kvd serve`` subprocess on a free loopback port."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    preexec: Callable[[], None] | None = None  # run in the child before kvd (limits)
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_path: Path | None = None

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> KvdProcess:
        self.log_path = self.data_dir.parent / f"kvd-{time.monotonic_ns()}.log"
        env = {**os.environ, **self.env}
        env.pop("KVD_SERVER_PORT", None)
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvd", "serve", "--port", "0", "--host", "127.0.0.1",
             "--data-dir", str(self.data_dir), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir.parent,
            preexec_fn=self.preexec,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_path.read_bytes())
            if match:
                self.port = int(match.group(2))
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"kvd exited {self.process.returncode}:\n{self.log()}")
            time.sleep(0.02)
        else:
            raise RuntimeError(f"kvd did not start:\n{self.log()}")
        if wait_ready:
            self.wait_ready(deadline - time.monotonic())
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/readyz").status == 200:
                    return
            except OSError:
                pass
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"kvd exited {self.process.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise RuntimeError(f"kvd not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = None
            all_headers = dict(headers or {})
            if body is not None:
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                all_headers.setdefault("Content-Type", "application/json")
            connection.request(method, path, body=payload, headers=all_headers)
            response = connection.getresponse()
            headers = HTTPHeaders()  # case-insensitive, like HTTP
            for name, value in response.getheaders():
                headers.add(name, value)
            return Response(response.status, headers, response.read())
        finally:
            connection.close()

    def get_key(self, key: str) -> Response:
        return self.request("GET", "/keys/" + quote(key, safe=""))

    def kill(self, signum: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def kvd_process(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``kvd_process(data_dir=None, args=[], env={}, preexec=None)`` starts a
    server; all are killed after."""
    started: list[KvdProcess] = []

    def start(data_dir: Path | None = None, args: list[str] | None = None,
              env: dict[str, str] | None = None, wait_ready: bool = True,
              preexec: Callable[[], None] | None = None) -> KvdProcess:
        server = KvdProcess(data_dir or tmp_path / "data", list(args or []), dict(env or {}), preexec)
        started.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in started:
        server.stop()
