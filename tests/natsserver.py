"""Real ``nats-server`` processes with JetStream for tests: one server or a 3-node cluster.

Use the fixtures from a test module by importing them (this works because
pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path``,
the same way ``from tests_support import FakeClock`` works)::

    from natsserver import nats_cluster, nats_server  # noqa: F401

    def test_x(nats_server: NatsServer) -> None:  # noqa: F811
        ...

Ruff (F811) reads a parameter named like an imported fixture as redefining
the import, hence the ``noqa`` on each test using one. ``pytest_plugins =
["natsserver"]`` in a test module also works, but registers the fixtures for
the whole session and warns that the module cannot be assert-rewritten.

``nats_server`` yields a started, ready :class:`NatsServer`; ``nats_cluster``
a started :class:`NatsCluster` whose JetStream meta leader is elected. Both are
function-scoped and stop their processes at teardown. Without a
``nats-server`` binary (``$NATS_SERVER``, ``PATH``, or ``/usr/sbin`` where
Debian puts it) they skip: ``apt-get install nats-server``.

Everything listens on 127.0.0.1 on ports the OS hands out (bind port 0, read
it, close it); a server that loses the race for a port is started again on new
ports. Each server keeps its config, its log and its JetStream store under its
own directory, so ``restart()`` brings the same server back on the same ports
with the same data. Only processes started here are ever signalled, by pid.

Notes on nats-server 2.9.10:

* ``/healthz?js-enabled-only=true`` answers 200 once the client, route and
  monitor listeners are up and JetStream is enabled (it answers 200 for a
  server without JetStream configured too, so readiness also reads ``/jsz``).
* Plain ``/healthz`` on a cluster member answers 503 until the member has a
  JetStream meta leader and is current with it, and until each stream replica
  it holds is current ("JetStream stream '$G > R' is not current"), then 200.
  ``js-server-only=true`` skips the stream check. Unknown parameters are ignored.
* Until then a restarted replica may answer ``STREAM.INFO`` itself, with its
  stale state (seen: 200 of 250 messages for up to ~1 s), so
  :meth:`NatsCluster.restart` waits for the full ``/healthz`` everywhere.
* A ``cluster {}`` block needs ``routes``, or JetStream refuses to start, so a
  single :class:`NatsServer` runs JetStream standalone (its ``cluster_port`` is
  reserved but unused).
* JetStream puts its files in ``<store_dir>/jetstream``.
* Debian installs the binary as ``/usr/sbin/nats-server``, which is not on a
  non-root user's ``PATH``; :func:`find_nats_server` looks there too.
* A fresh 3-node cluster elects its meta leader in about 0.5 s. After the
  leader of an R3 stream is SIGKILLed, publishes fail for 5-8 s until a new
  stream leader is elected (raft election timeouts are 4-9 s and not
  configurable); after SIGTERM the leader steps down and the gap is 0.1-1 s.
  A restarted replica catches up within a couple of seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "INSTALL_HINT",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "find_nats_server",
    "free_ports",
    "nats_cluster",
    "nats_server",
]

INSTALL_HINT = "install it with `apt-get install nats-server` (or set $NATS_SERVER to its path)"
HOST = "127.0.0.1"
START_ATTEMPTS = 5
_BIND_FAILURE = "address already in use"


class NatsServerError(RuntimeError):
    """A nats-server did not start, did not become ready, or died."""


def find_nats_server() -> str | None:
    """The nats-server binary: ``$NATS_SERVER``, then ``PATH``, then Debian's ``/usr/sbin``."""
    explicit = os.environ.get("NATS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("nats-server")
    if found:
        return found
    # /usr/sbin is not on a non-root user's PATH on Debian, but the package installs there.
    for candidate in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports the OS considers free right now.

    All are bound to port 0 at once (so they differ), read, then closed.
    """
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _http_get(url: str, timeout: float = 1.0) -> tuple[int, Any]:
    """(status, decoded JSON body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid NATS config string


class NatsServer:
    """One nats-server process with JetStream, under ``tmp_dir / name``.

    ``routes`` (other servers' ``nats-route://`` URLs) and ``cluster_name``
    make it a cluster member; :class:`NatsCluster` sets them.
    """

    def __init__(
        self,
        tmp_dir: Path | str,
        name: str = "nats",
        *,
        cluster_name: str | None = None,
        routes: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.name = name
        self.base_dir = Path(tmp_dir) / name
        self.cluster_name = cluster_name
        self.routes = list(routes)
        self.binary = binary or find_nats_server()
        if self.binary is None:
            raise NatsServerError(f"nats-server not found; {INSTALL_HINT}")
        self.process: subprocess.Popen[bytes] | None = None
        self.client_port = 0
        self.cluster_port = 0
        self.monitor_port = 0
        self.choose_ports()

    # --- where things are -------------------------------------------------

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.client_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{HOST}:{self.cluster_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.monitor_port}"

    @property
    def store_dir(self) -> Path:
        """The configured ``store_dir`` (JetStream writes into ``store_dir / "jetstream"``)."""
        return self.base_dir / "store"

    @property
    def conf_path(self) -> Path:
        return self.base_dir / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "nats.log"

    @property
    def pid(self) -> int | None:
        """The process id while the process runs, else None."""
        return self.process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __repr__(self) -> str:
        return f"<NatsServer {self.name} {self.url} pid={self.pid}>"

    # --- config -------------------------------------------------------------

    def choose_ports(self, ports: Sequence[int] | None = None) -> None:
        """Take fresh (client, cluster, monitor) ports: ``ports``, or three free ones from the OS."""
        self.client_port, self.cluster_port, self.monitor_port = ports or free_ports(3)

    def config_text(self) -> str:
        lines = [
            f"server_name: {_q(self.name)}",
            f"listen: {_q(f'{HOST}:{self.client_port}')}",
            f"http: {_q(f'{HOST}:{self.monitor_port}')}",
            f"jetstream {{ store_dir: {_q(str(self.store_dir))} }}",
        ]
        if self.routes:
            routes = ", ".join(_q(route) for route in self.routes)
            lines.append(
                f"cluster {{ name: {_q(self.cluster_name or 'kvd')}, "
                f"listen: {_q(f'{HOST}:{self.cluster_port}')}, routes: [{routes}] }}"
            )
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config_text())

    # --- lifecycle ------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process from the config file and return at once."""
        if self.running:
            raise NatsServerError(f"{self!r} is already running")
        self.write_config()
        with open(self.log_path, "ab") as log:
            log.write(f"--- harness: starting {self.name} ({time.strftime('%H:%M:%S')}) ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],  # type: ignore[list-item]
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.base_dir, start_new_session=True,
            )

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Until the listeners are up and JetStream is enabled (``/healthz?js-enabled-only=true``).

        Raises NatsServerError if the process exits first (``bind_failed()`` then
        tells whether a port was taken) or the timeout passes.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                code = None if self.process is None else self.process.returncode
                raise NatsServerError(f"{self.name} exited with {code}\n{self.log_tail()}")
            status, _ = _http_get(f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=0.5)
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise NatsServerError(f"{self.name} not listening after {timeout}s\n{self.log_tail()}")
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until clients can connect and JetStream is enabled on this server.

        Checks ``/healthz?js-enabled-only=true`` (200), that ``/jsz`` reports a
        JetStream config, and that the client port accepts a TCP connection.
        For a cluster member this does not wait for the meta leader; see
        :meth:`NatsCluster.wait_ready`.
        """
        deadline = time.monotonic() + timeout
        self.wait_listening(timeout)
        while True:
            status, jsz = _http_get(f"{self.monitor_url}/jsz", timeout=0.5)
            if status == 200 and isinstance(jsz, dict) and jsz.get("config") and not jsz.get("disabled"):
                try:
                    socket.create_connection((HOST, self.client_port), timeout=0.5).close()
                    return
                except OSError:
                    pass
            if not self.running or time.monotonic() > deadline:
                raise NatsServerError(f"{self.name} JetStream not ready after {timeout}s\n{self.log_tail()}")
            time.sleep(0.02)

    def bind_failed(self) -> bool:
        """Whether the process exited because a port was taken."""
        return not self.running and _BIND_FAILURE in self.log_tail(20).lower()

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start and wait until ready; on a port race, pick new ports and try again."""
        for attempt in range(START_ATTEMPTS):
            self.spawn()
            try:
                self.wait_ready(timeout)
                return self
            except NatsServerError:
                if not self.bind_failed() or attempt == START_ATTEMPTS - 1:
                    self.kill()
                    raise
                self.choose_ports()
        raise AssertionError("unreachable")

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)  # our own child, by pid
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL and reap: a crash, nothing flushed."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def restart(self, timeout: float = 10.0, *, graceful: bool = True) -> NatsServer:
        """Stop (or kill, ``graceful=False``) if running; start again on the same ports and store."""
        if graceful:
            self.stop()
        else:
            self.kill()
        self.spawn()
        try:
            self.wait_ready(timeout)
        except NatsServerError:
            self.kill()
            raise
        return self

    # --- looking inside ---------------------------------------------------------

    def healthz(self, **params: str) -> tuple[int, Any]:
        """``(status, body)`` of ``/healthz`` with ``params`` (e.g. ``js_server_only="true"``)."""
        query = "&".join(f"{k.replace('_', '-')}={v}" for k, v in params.items())
        return _http_get(f"{self.monitor_url}/healthz" + (f"?{query}" if query else ""))

    def jsz(self, **params: str) -> dict[str, Any]:
        """``/jsz`` as a dict (``{}`` if it does not answer), e.g. ``jsz(streams="true")``."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        status, body = _http_get(f"{self.monitor_url}/jsz" + (f"?{query}" if query else ""))
        return body if status == 200 and isinstance(body, dict) else {}

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class NatsCluster:
    """``size`` nats-servers (``n0``, ``n1``, ...) in one JetStream cluster on loopback."""

    def __init__(self, tmp_dir: Path | str, size: int = 3, name: str = "kvd", *,
                 binary: str | None = None) -> None:
        self.name = name
        self.servers = [
            NatsServer(tmp_dir, f"n{i}", cluster_name=name, binary=binary) for i in range(size)
        ]
        self.choose_ports()

    def choose_ports(self) -> None:
        """Fresh ports for every server, all distinct, and routes to match."""
        ports = free_ports(3 * len(self.servers))
        for i, server in enumerate(self.servers):
            server.choose_ports(ports[3 * i:3 * i + 3])
        for server in self.servers:
            server.routes = [other.route_url for other in self.servers if other is not server]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def __getitem__(self, i: int) -> NatsServer:
        return self.servers[i]

    def __len__(self) -> int:
        return len(self.servers)

    def start(self, timeout: float = 20.0) -> NatsCluster:
        """Start every server and wait for a meta leader; on a port race, redo it on new ports."""
        for attempt in range(START_ATTEMPTS):
            for server in self.servers:
                server.spawn()
            try:
                for server in self.servers:
                    server.wait_ready(timeout)
                self.wait_ready(timeout)
                return self
            except NatsServerError:
                lost_race = any(server.bind_failed() for server in self.servers)
                self.stop()
                if not lost_race or attempt == START_ATTEMPTS - 1:
                    raise
                self.choose_ports()
        raise AssertionError("unreachable")

    def meta_leader(self) -> str | None:
        """The meta leader's server name if every running server agrees on one, else None."""
        leaders = set()
        for server in self.servers:
            if server.running:
                meta = server.jsz().get("meta_cluster") or {}
                leaders.add(meta.get("leader") or None)
        if len(leaders) == 1:
            return leaders.pop()
        return None

    def wait_ready(self, timeout: float = 20.0) -> str:
        """Until the running servers agree on a JetStream meta leader and are all healthy.

        Returns the leader's name. Uses ``/jsz`` (``meta_cluster.leader``) and the
        full ``/healthz``, which answers 503 until the server follows the meta
        leader and every stream replica it holds is current. (Waiting for the
        replicas matters: a restarted replica that has not caught up can answer
        ``STREAM.INFO`` with its stale state for about a second on 2.9.10.)
        """
        deadline = time.monotonic() + timeout
        running = [server for server in self.servers if server.running]
        while True:
            leader = self.meta_leader()
            if leader and all(server.healthz()[0] == 200 for server in running):
                return leader
            dead = [server for server in running if not server.running]
            if dead or time.monotonic() > deadline:
                why = f"{[s.name for s in dead]} died" if dead else f"no meta leader after {timeout}s"
                raise NatsServerError(f"cluster {self.name}: {why}\n" + self.log_tails())
            time.sleep(0.05)

    def stream_leader(self, stream: str, account: str = "$G") -> int | None:
        """Index in ``servers`` of ``stream``'s current leader, as the running servers report it."""
        names = {server.name: i for i, server in enumerate(self.servers)}
        for server in self.servers:
            if not server.running:
                continue
            jsz = server.jsz(accounts="true", streams="true")
            for acc in jsz.get("account_details") or []:
                if acc.get("name") != account:
                    continue
                for detail in acc.get("stream_detail") or []:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if detail.get("name") == stream and leader in names:
                        return names[leader]
        return None

    def kill(self, i: int) -> None:
        """SIGKILL server ``i``."""
        self.servers[i].kill()

    def stop(self, i: int | None = None) -> None:
        """SIGTERM server ``i``, or every server."""
        for server in self.servers if i is None else [self.servers[i]]:
            server.stop()

    def restart(self, i: int, timeout: float = 20.0) -> None:
        """Bring server ``i`` back (same ports and store) and wait until the cluster is healthy.

        That includes server ``i``'s stream replicas having caught up (see :meth:`wait_ready`).
        """
        self.servers[i].restart(timeout)
        self.wait_ready(timeout)

    def log_tails(self, lines: int = 20) -> str:
        return "\n".join(f"--- {s.name}: {s.log_path} ---\n{s.log_tail(lines)}" for s in self.servers)


# --- pytest fixtures ---------------------------------------------------------------


def _binary_or_skip() -> str:
    binary = find_nats_server()
    if binary is None:
        pytest.skip(f"nats-server not found on PATH; {INSTALL_HINT}")
    return binary


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A started single nats-server with JetStream; stopped at teardown."""
    server = NatsServer(tmp_path / "nats", binary=_binary_or_skip()).start()
    try:
        yield server
    finally:
        server.stop()
        print(f"--- {server.log_path} ---\n{server.log_tail(20)}")  # shown if the test failed


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A started 3-node JetStream cluster with an elected meta leader; stopped at teardown."""
    cluster = NatsCluster(tmp_path / "nats-cluster", binary=_binary_or_skip()).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        print(cluster.log_tails())  # shown if the test failed
