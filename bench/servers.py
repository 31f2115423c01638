"""Start and stop the servers the benchmark drives, and talk to them over plain HTTP.

Every server listens on a free loopback port (``--port 0`` where the server
supports it, else a port the OS handed out a moment before) with a fresh data
directory, optionally pinned to one core with ``taskset``. Children get
SIGTERM if the benchmark process dies (``PR_SET_PDEATHSIG``), so no run can
leave a server behind.
"""

from __future__ import annotations

import base64
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
KVD_PATH_HELP = "a checkout whose kvd to run, e.g. a git worktree of another commit (default: this one)"
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT = 60.0
HOST = "127.0.0.1"

# A 100-byte JSON string value: the same bytes bench/wrk/kv.lua sends.
VALUE = '"' + "x" * 98 + '"'


class StartError(RuntimeError):
    """A server did not come up; the message ends with the tail of its log."""


@dataclass
class Options:
    """How servers are launched."""

    python: str = sys.executable
    pin: tuple[str, ...] = ()  # e.g. ("taskset", "-c", "0")
    work_dir: Path | None = None  # parent of the per-run data directories
    kvd_path: Path = REPO_ROOT  # the checkout whose kvd runs (a worktree of another commit: before/after)


@dataclass
class Running:
    """One started server: its processes (the first is the one clients talk to) and logs."""

    name: str
    url: str
    data_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    def memory_kib(self) -> tuple[int, int]:
        """(VmHWM, VmRSS) summed over the server's processes, in KiB."""
        peak = current = 0
        for proc in self.procs:
            hwm, rss = proc_memory_kib(proc.pid)
            peak += hwm
            current += rss
        return peak, current

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process (front first), then SIGKILL what is left after ``timeout``."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        tails = []
        for path in self.logs:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            tails.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(tails)


def proc_memory_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of one process from /proc/PID/status, in KiB; (0, 0) once it is gone."""
    hwm = rss = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return hwm, rss


def free_port() -> int:
    """A port the OS considers free right now (for servers that cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the benchmark process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(
    argv: list[str], log: Path, opts: Options, *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*opts.pin, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            preexec_fn=die_with_parent,
        )


def wait_for_port_line(proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> int:
    """The port from the ``listening on http://127.0.0.1:PORT`` line the server logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_bytes()) if log.exists() else None
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise StartError(f"exited with status {proc.returncode} before listening")
        time.sleep(0.01)
    raise StartError(f"no 'listening on' line within {timeout:.0f}s")


def wait_until(
    check: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"exited with status {proc.returncode} while waiting for {what}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise StartError(f"not ready within {timeout:.0f}s ({what})")


def call(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 30.0,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    """One request; (status, body). Reuses ``conn`` when given (keep-alive)."""
    own = conn is None
    if conn is None:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def clean_env() -> dict[str, str]:
    """The environment minus KVD_* settings, so every kvd runs on the SPEC's defaults."""
    return {name: value for name, value in os.environ.items() if not name.startswith("KVD_")}


def kvd_env(opts: Options) -> dict[str, str]:
    """``clean_env`` with ``opts.kvd_path`` first on PYTHONPATH.

    That checkout's kvd runs, whichever environment the interpreter comes
    from: kvd starts in its data directory, never in a checkout, so nothing
    ahead of PYTHONPATH on ``sys.path`` can hold another kvd.
    """
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(opts.kvd_path), env.get("PYTHONPATH")]))
    return env


# --- one launcher per server -------------------------------------------------------------


def start_kvd(data_dir: Path, opts: Options, *, fsync: str) -> Running:
    """``python -m kvd serve --port 0`` on the SPEC's defaults (no config file) but ``fsync``.

    Logs at info level: the ``listening on`` and ``replay took`` lines are info.
    """
    env = kvd_env(opts)
    argv = [opts.python, "-m", "kvd", "serve", "--port", "0", "--data-dir", str(data_dir / "store"),
            "--fsync", fsync, "--log-level", "info"]
    # cwd is the run directory, where no config/kvd.toml exists: defaults only.
    return _start_python_server("kvd", argv, data_dir, opts, env=env, probe=("/readyz", 200))


def start_bare(data_dir: Path, opts: Options, *, loop: str) -> Running:
    argv = [opts.python, str(BENCH_DIR / "bare_tornado.py"), "--port", "0", "--loop", loop]
    return _start_python_server("bare", argv, data_dir, opts)


def start_flask(data_dir: Path, opts: Options) -> Running:
    argv = [opts.python, str(BENCH_DIR / "original_flask.py"), "--port", "0",
            "--data-dir", str(data_dir / "store")]
    return _start_python_server("flask", argv, data_dir, opts)


def _start_python_server(
    name: str, argv: list[str], data_dir: Path, opts: Options, *,
    env: dict[str, str] | None = None, probe: tuple[str, int] = ("/keys/probe", 404),
) -> Running:
    """A server that prints its port; up once ``probe`` (path, status) answers as expected."""
    log = data_dir / f"{name}.log"
    proc = spawn(argv, log, opts, cwd=data_dir, env=env if env is not None else clean_env())
    running = Running(name, "", data_dir, [proc], [log])
    path, status = probe
    try:
        running.url = f"http://{HOST}:{wait_for_port_line(proc, log)}"
        wait_until(lambda: call(running.url, "GET", path, timeout=2)[0] == status, proc, path)
    except StartError:
        running.stop()
        raise
    return running


def _redis_pong(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def start_webdis(data_dir: Path, opts: Options) -> Running:
    """redis-server without persistence, and webdis in front of it, both pinned."""
    redis_port, http_port = free_port(), free_port()
    redis_log, webdis_log = data_dir / "redis.log", data_dir / "webdis.log"
    redis = spawn(
        ["redis-server", "--port", str(redis_port), "--bind", HOST, "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--dir", str(data_dir)],
        redis_log, opts, cwd=data_dir,
    )
    running = Running("webdis", f"http://{HOST}:{http_port}", data_dir, [redis], [redis_log])
    try:
        wait_until(lambda: _redis_pong(redis_port), redis, "redis PING")
        # Debian's packaged settings (2 threads, verbosity 3), on our ports, in the foreground.
        config = {
            "redis_host": HOST, "redis_port": redis_port, "redis_auth": None,
            "http_host": HOST, "http_port": http_port, "threads": 2,
            "daemonize": False, "database": 0,
            "acl": [{"disabled": ["DEBUG"]}],
            "verbosity": 3, "logfile": str(webdis_log),
        }
        config_path = data_dir / "webdis.json"
        config_path.write_text(json.dumps(config, indent=2))
        webdis = spawn(["webdis", str(config_path)], data_dir / "webdis.out", opts, cwd=data_dir)
        # Front first, so stop() ends webdis before the redis it talks to.
        running.procs.insert(0, webdis)
        running.logs += [webdis_log, data_dir / "webdis.out"]
        wait_until(lambda: call(running.url, "GET", "/PING", timeout=2)[0] == 200, webdis, "webdis /PING")
    except StartError:
        running.stop()
        raise
    return running


def start_etcd(data_dir: Path, opts: Options) -> Running:
    """A single-member etcd (every write fsynced to its WAL) with the v3 JSON gateway."""
    client_port, peer_port = free_port(), free_port()
    client, peer = f"http://{HOST}:{client_port}", f"http://{HOST}:{peer_port}"
    log = data_dir / "etcd.log"
    proc = spawn(
        ["etcd", "--name", "bench", "--data-dir", str(data_dir / "etcd"),
         "--listen-client-urls", client, "--advertise-client-urls", client,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"bench={peer}", "--log-level", "warn"],
        log, opts, cwd=data_dir,
    )
    running = Running("etcd", client, data_dir, [proc], [log])

    def healthy() -> bool:
        status, body = call(client, "GET", "/health", timeout=2)
        return status == 200 and b"true" in body

    try:
        wait_until(healthy, proc, "/health")
    except StartError:
        running.stop()
        raise
    return running


# --- loading data and checking answers, per request dialect ------------------------------


def key_names(count: int) -> list[str]:
    return [f"k{i}" for i in range(count)]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _parallel(url: str, requests: Iterable[tuple[str, str, bytes, str | None]], workers: int) -> None:
    """Send requests over ``workers`` keep-alive connections; raise on any non-2xx."""
    local = threading.local()
    parts = urlsplit(url)

    def send(request: tuple[str, str, bytes, str | None]) -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        method, path, body, content_type = request
        status, answer = call(url, method, path, body, content_type, conn=local.conn)
        if not 200 <= status < 300:
            raise RuntimeError(f"preload {method} {path}: {status} {answer[:200]!r}")

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(send, requests):
            pass


def preload(strategy: str, url: str, count: int) -> None:
    """Store keys k0..k(count-1), each with VALUE, the fastest way the server offers."""
    names = key_names(count)
    if strategy == "bulk":  # kvd and the original design: PUT /keys with many pairs
        for start in range(0, count, 5000):
            body = "{" + ",".join(f'"{k}":{VALUE}' for k in names[start : start + 5000]) + "}"
            status, answer = call(url, "PUT", "/keys", body.encode(), "application/json", timeout=120)
            if status != 200:
                raise RuntimeError(f"preload PUT /keys: {status} {answer[:200]!r}")
    elif strategy == "single":  # the bare reference: PUT /keys/{id}, several connections
        _parallel(url, (("PUT", f"/keys/{k}", VALUE.encode(), "application/json") for k in names), 8)
    elif strategy == "webdis":
        _parallel(url, (("PUT", f"/SET/{k}", VALUE.encode(), None) for k in names), 8)
    elif strategy == "etcd":  # transactions of 100 puts (etcd allows at most 128 ops)
        value = _b64(VALUE)
        batches = []
        for start in range(0, count, 100):
            ops = [{"requestPut": {"key": _b64(k), "value": value}} for k in names[start : start + 100]]
            batches.append(("POST", "/v3/kv/txn", json.dumps({"success": ops}).encode(), "application/json"))
        _parallel(url, batches, 4)
    else:
        raise ValueError(f"unknown preload strategy {strategy!r}")


def expected_listing(count: int) -> int:
    """How many of k0..k(count-1) the list workload's pattern (prefix k1) matches."""
    return sum(1 for k in key_names(count) if k.startswith("k1"))


def check_answers(flavor: str, url: str, count: int) -> None:
    """One GET and one listing, to be sure the server holds what the workloads expect."""
    key = f"k{count // 2}"
    if flavor in ("kvd", "flask"):
        status, body = call(url, "GET", f"/keys/{key}")
        got = json.loads(body).get(key) if status == 200 else None
        status, body = call(url, "GET", "/keys?filter=" + quote("k1$"))
        listed = len(json.loads(body)) if status == 200 else -1
    elif flavor == "webdis":
        status, body = call(url, "GET", f"/GET/{key}")
        got = json.loads(json.loads(body)["GET"]) if status == 200 else None
        status, body = call(url, "GET", "/KEYS/k1*")
        listed = len(json.loads(body)["KEYS"]) if status == 200 else -1
    elif flavor == "etcd":
        status, body = call(url, "POST", "/v3/kv/range", json.dumps({"key": _b64(key)}).encode())
        kvs = json.loads(body).get("kvs", []) if status == 200 else []
        got = json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None
        prefix = {"key": _b64("k1"), "range_end": _b64("k2"), "count_only": True}
        status, body = call(url, "POST", "/v3/kv/range", json.dumps(prefix).encode())
        listed = int(json.loads(body).get("count", 0)) if status == 200 else -1
    else:
        raise ValueError(f"unknown flavour {flavor!r}")
    if got != json.loads(VALUE):
        raise RuntimeError(f"{flavor}: GET {key} did not return the preloaded value")
    if listed != expected_listing(count):
        raise RuntimeError(f"{flavor}: listing matched {listed} keys, expected {expected_listing(count)}")


def binary_missing(*names: str) -> str | None:
    """None when every binary is on PATH, else a note naming the missing ones."""
    missing = [name for name in names if shutil.which(name) is None]
    return f"{', '.join(missing)} not installed (bench/setup.sh installs it)" if missing else None


def run_order(names: list[str], repeat: int, repeats: int) -> list[str]:
    """The servers in the order repeat number ``repeat`` (from 0) of ``repeats`` runs them.

    Each repeat starts a different part of the way down the list, so no server
    always runs first or right after the same neighbour. On these machines the
    place matters: in six rounds of a GET A/B between two kvd commits with the
    same request path, whichever ran first in its round was faster every time,
    by 10 to 36 %.
    """
    shift = repeat * len(names) // max(repeats, 1) % max(len(names), 1)
    return names[shift:] + names[:shift]
