"""``kvd torture``: SIGKILL a real server under concurrent writers, again and again, and check.

Each cycle runs one ``kvd serve`` subprocess on ``<D>/data`` (127.0.0.1, port
0), lets writer threads hammer it (batch ``PUT /keys``, ``PUT /keys/{id}``,
merge-patch ``PATCH``, ``DELETE /keys/{id}``, now and then ``DELETE /keys``,
a good share of it with a short ``?expire_in=``), SIGKILLs it after a random
delay, then checks the store the kill left behind:

1. ``kvd journal verify`` on the directory exactly as the crash left it
   (torn tail and half-done compaction included): exit 0, and its head seq
   at least the highest revision any write was acknowledged with;
2. a restarted server's ``/readyz`` revision at least that head;
3. every key against the harness's model: each acknowledged write present
   with its latest acknowledged value, or with the value of a write whose
   request was in flight at the kill; no deleted or cleared key back unless
   an in-flight write could have recreated it; no key read back after its
   acknowledged expiry; an in-flight batch (or clear) all applied or not at
   all; sampled ``GET /keys/{id}`` agree with the listing and carry the
   acknowledged revision as their ``ETag``.

The settings make the interesting moments common: 64 KiB segments, large
batches (one record bigger than a segment), and compaction whenever 64 KiB
are dead, checked every 0.2 s, so many kills land in the middle of a
compaction (the forked snapshot writer, the renames, the retirement) or of
a large batch; the report counts how many did.

The model, and why it is sound under concurrency:

- Every writer thread owns its own keys and has at most one request in
  flight, so each key's acknowledged history is one linear sequence, known
  exactly: the harness never has to guess in which order two racing
  requests from different threads were applied. Within a key, real time
  orders the writes (the next starts after the previous was answered).
- ``DELETE /keys`` touches every key, so it would race every writer. It is
  sent by a coordinator that first pauses the writers and waits until none
  has a request in flight; the clear is then the only request in flight, its
  acknowledgement makes every key absent, and a kill during it allows, per
  key, the state before or absent, all keys the same way.
- Expiry runs on the server's wall clock, which the harness shares but
  cannot stop (no FakeClock across processes). A write with ``expire_in=S``
  sent at wall-clock time ``t0`` and answered at ``t1`` expires at some
  instant in ``[t0 + S, t1 + S]``; a read made between ``u0`` and ``u1``
  must see the key when ``u1`` is before that window, must not when ``u0``
  is after it, and may either way inside it (widened by MARGIN seconds).
  PATCH keeps the window of the value it patches; a 404 from PATCH or DELETE
  is accepted only where the window says the key may have expired.
- A request without an answer when the server died may or may not have
  committed. Its outcome becomes an alternative state for each key it
  touches; after the check the model takes whichever state was found, so
  the next cycle starts from a known state again.

Only a loss of acknowledged data, a state nothing explains, a failed verify,
or a server that does not come back counts against kvd. The run stops at the
first such cycle and leaves the directory as it was, for inspection.

Memory: the model holds one state per key (writers x KEYS_PER_WRITER).
Disk: with ``--archive`` every retired segment is kept, so the directory and
each verify grow with the run; without it the directory stays small.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

MARKER = "TORTURE"  # marks a directory this command made (and may reuse)
DATA = "data"
SERVER_LOG = "server.log"
KILLED_LOG = "server-killed.log"  # the log of the server killed last
KEYS_PER_WRITER = 64
MARGIN = 0.1  # seconds of slack around expiry windows (one wall clock, read by two processes)
REQUEST_TIMEOUT = 60.0
START_TIMEOUT = 120.0
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
VERIFY_HEAD = re.compile(r"^head:\s+seq (\d+)", re.MULTILINE)
JSON_TYPE = {"Content-Type": "application/json"}
MERGE_PATCH_TYPE = {"Content-Type": "application/merge-patch+json"}

# The server's settings: small segments and eager compaction, so kills land
# in roll-overs, snapshot writes and retirements; the default plugins, so
# expiry works and no auth plugin from the user's environment gets in the way.
SERVER_SETTINGS = {
    "KVD_JOURNAL_SEGMENT_BYTES": str(64 * 1024),
    "KVD_JOURNAL_COMPACT_MIN_DEAD_BYTES": str(64 * 1024),
    "KVD_JOURNAL_COMPACT_DEAD_RATIO": "0.25",
    "KVD_JOURNAL_COMPACT_CHECK_SECONDS": "0.2",
    "KVD_PLUGINS_ENABLED": "expiry,metrics,filter",
    "KVD_PLUGINS_EXPIRY_SWEEP_INTERVAL": "0.1",
}


class UsageError(Exception):
    """The command cannot run as asked (exit 2)."""


# --- the model -------------------------------------------------------------------


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()
"""The state of a key that does not exist (values are JSON, so any real value differs)."""


@dataclass(frozen=True)
class KeyState:
    """What one key holds after a write: value (or ABSENT), revision, expiry window."""

    value: Any
    revision: int | None = None
    """The seq of the write that made it; None when unknown (an in-flight write's)."""
    expires: tuple[float, float] | None = None
    """Earliest and latest wall-clock instant the value expires at; None: never."""

    @property
    def absent(self) -> bool:
        return self.value is ABSENT

    def may_be_present(self, start: float, margin: float = MARGIN) -> bool:
        """Whether the key can still have held this value at some instant from ``start`` on."""
        if self.absent:
            return False
        return self.expires is None or start <= self.expires[1] + margin

    def may_be_absent(self, end: float, margin: float = MARGIN) -> bool:
        """Whether the key can have been absent at some instant up to ``end``."""
        if self.absent:
            return True
        return self.expires is not None and end >= self.expires[0] - margin

    def explains(self, observed: Any, start: float, end: float, margin: float = MARGIN) -> bool:
        """Whether a read made between ``start`` and ``end`` may find ``observed``."""
        if observed is ABSENT:
            return self.may_be_absent(end, margin)
        return not self.absent and observed == self.value and self.may_be_present(start, margin)

    def describe(self) -> str:
        if self.absent:
            return "absent"
        text = _short(self.value)
        if self.revision is not None:
            text += f" (revision {self.revision})"
        if self.expires is not None:
            text += f" expiring in [{self.expires[0]:.3f}, {self.expires[1]:.3f}]"
        return text


GONE = KeyState(ABSENT)


def _short(value: Any) -> str:
    if value is ABSENT:
        return "absent"
    if isinstance(value, dict):
        value = {name: part for name, part in value.items() if name != "pad"}
    return json.dumps(value, sort_keys=True)[:120]


@dataclass
class InFlight:
    """A write whose request had no answer when the server died: all of it applied, or none."""

    kind: str
    outcome: dict[str, KeyState]  # each key's state if it was applied


@dataclass
class CheckResult:
    violations: list[str]
    resolved: dict[str, KeyState]
    """The model after the check: each key's state as found (acknowledged or in-flight)."""
    applied: dict[str, bool]
    """Per key explained only by an in-flight write: True (the write committed)."""
    expired_checked: int = 0
    """Keys whose acknowledged expiry had surely passed, found absent as they must be."""


def check_state(
    acked: dict[str, KeyState],
    in_flight: Iterable[InFlight],
    observed: dict[str, Any],
    start: float,
    end: float,
    margin: float = MARGIN,
) -> CheckResult:
    """Compare a listing read between ``start`` and ``end`` with the model.

    ``acked`` holds every key the harness writes (absent ones as GONE); a
    key in ``observed`` that is not there is a violation too.
    """
    in_flight = list(in_flight)
    alternatives: dict[str, list[KeyState]] = {}
    for write in in_flight:
        for key, state in write.outcome.items():
            alternatives.setdefault(key, []).append(state)
    violations: list[str] = []
    resolved: dict[str, KeyState] = {}
    applied: dict[str, bool] = {}
    by_acked: dict[str, bool] = {}
    by_flight: dict[str, bool] = {}
    expired_checked = 0
    for key, state in acked.items():
        found = observed.get(key, ABSENT)
        acked_ok = state.explains(found, start, end, margin)
        flight_ok = [alt for alt in alternatives.get(key, []) if alt.explains(found, start, end, margin)]
        by_acked[key], by_flight[key] = acked_ok, bool(flight_ok)
        if acked_ok:
            if found is ABSENT:
                resolved[key] = GONE
                if not state.absent and not state.may_be_present(start, margin):
                    expired_checked += 1
            else:
                resolved[key] = state
        elif flight_ok:
            resolved[key] = GONE if found is ABSENT else flight_ok[0]
            applied[key] = True
        else:
            allowed = [state.describe()] + [alt.describe() for alt in alternatives.get(key, [])]
            violations.append(
                f"key {key!r}: found {_short(found)}, allowed: {' or '.join(allowed)}"
                + _diagnosis(state, found, start)
            )
            resolved[key] = GONE if found is ABSENT else KeyState(found)
    for key in sorted(set(observed) - set(acked)):
        violations.append(f"key {key!r}: found {_short(observed[key])}, but no writer wrote it")
    for write in in_flight:
        # All or nothing: no key may need the write applied while another needs it not applied.
        needs_applied = [k for k in write.outcome if by_flight.get(k) and not by_acked.get(k)]
        needs_not = [k for k in write.outcome if by_acked.get(k) and not by_flight.get(k)]
        if needs_applied and needs_not:
            violations.append(
                f"in-flight {write.kind} half applied: {len(needs_applied)} keys have it "
                f"(e.g. {needs_applied[0]!r}), {len(needs_not)} do not (e.g. {needs_not[0]!r})"
            )
    return CheckResult(violations, resolved, applied, expired_checked)


def _diagnosis(state: KeyState, found: Any, start: float) -> str:
    if found is ABSENT:
        return " -- an acknowledged write is lost"
    if state.absent:
        return " -- a deleted, cleared or expired key is back"
    if not state.may_be_present(start):
        return " -- an expired key is back"
    return " -- the value differs from the acknowledged one"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396, written here again so the model does not share kvd's code."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


# --- one server ---------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    connection: http.client.HTTPConnection, method: str, path: str,
    body: bytes | None = None, headers: dict[str, str] | None = None,
) -> Answer:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    payload = response.read()
    return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)


def key_path(key: str) -> str:
    return "/keys/" + quote(key, safe="")


def child_environment(settings: dict[str, str]) -> dict[str, str]:
    """The environment for kvd subprocesses: no ``KVD_*`` from ours, kvd importable."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KVD_")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.update(settings)
    return env


class Server:
    """One ``kvd serve`` subprocess on 127.0.0.1, port 0, its log in ``log_path``."""

    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = START_TIMEOUT) -> int:
        """Start and wait until ready; returns the ``/readyz`` revision."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvd", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--data-dir", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.data_dir.parent,
            )
        deadline = time.monotonic() + timeout
        while not (match := LISTENING.search(self.log_path.read_bytes())):
            self._check_alive(deadline, "did not open its port")
            time.sleep(0.01)
        self.port = int(match.group(1))
        while True:
            self._check_alive(deadline, "did not become ready")
            try:
                answer = self.call("GET", "/readyz", timeout=5)
            except (OSError, http.client.HTTPException):
                answer = None
            if answer is not None and answer.status == 200:
                return int(answer.json()["revision"])
            time.sleep(0.01)

    def _check_alive(self, deadline: float, what: str) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServerFailed(f"kvd serve exited with status {self.process.returncode}", self.log())
        if time.monotonic() > deadline:
            self.kill()
            raise ServerFailed(f"kvd serve {what} in time", self.log())

    def connection(self, timeout: float = REQUEST_TIMEOUT) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = REQUEST_TIMEOUT) -> Answer:
        connection = self.connection(timeout)
        try:
            return request(connection, method, path, body, headers)
        finally:
            connection.close()

    def kill(self) -> bool:
        """SIGKILL the server (only it: its snapshot writer dies with it) and reap it.

        Returns whether it was still running.
        """
        if self.process is None:
            return False
        running = self.process.poll() is None
        if running:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)
        return running

    def stop(self) -> int:
        """SIGTERM: drain, flush, exit; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            return -signal.SIGKILL

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class ServerFailed(Exception):
    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def wait_unlocked(data_dir: Path, timeout: float = 30.0) -> float | None:
    """Wait until nothing holds ``LOCK`` (a dying snapshot writer may, briefly).

    Returns the seconds waited, None when it was still held after ``timeout``.
    """
    path = data_dir / "LOCK"
    if not path.exists():
        return 0.0
    started = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() - started > timeout:
                    return None
                time.sleep(0.005)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return time.monotonic() - started
    finally:
        os.close(fd)


@dataclass
class Verification:
    ok: bool
    head_seq: int | None
    torn: bool
    output: str


def verify_journal(data_dir: Path, env: dict[str, str]) -> Verification:
    """``kvd journal verify`` as a user runs it, in a subprocess (independent of kvd's internals)."""
    finished = subprocess.run(
        [sys.executable, "-m", "kvd", "journal", "verify", "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=env, cwd=data_dir.parent, timeout=3600,
        stdin=subprocess.DEVNULL,
    )
    output = finished.stdout + finished.stderr
    head = VERIFY_HEAD.search(finished.stdout)
    return Verification(
        finished.returncode == 0, int(head.group(1)) if head else None,
        "torn last record" in output, output,
    )


def compaction_evidence(data_dir: Path) -> list[str]:
    """What a compaction cut short leaves on disk: a temp snapshot, an unretired segment or snapshot."""
    found = []
    if any(path.name.startswith("snapshot-") and path.name.endswith(".tmp") for path in data_dir.iterdir()):
        found.append("snapshot .tmp")
    snapshots = sorted(int(p.name[len("snapshot-"):-len(".jsonl")]) for p in data_dir.glob("snapshot-*.jsonl"))
    if len(snapshots) > 1:
        found.append("older snapshot")
    if snapshots:
        firsts = sorted(int(p.name[: -len(".jsonl")]) for p in data_dir.glob("[0-9]*.jsonl"))
        # A segment is made redundant by the snapshot when the next one starts at or before seq+1.
        if any(nxt <= snapshots[-1] + 1 for nxt in firsts[1:]):
            found.append("unretired segment")
    return found


# --- writers --------------------------------------------------------------------------


class Gate:
    """Lets the coordinator pause the writers and know that none has a request in flight."""

    def __init__(self, killed: threading.Event) -> None:
        self.killed = killed
        self.condition = threading.Condition()
        self.paused = False
        self.busy = 0

    def enter(self) -> bool:
        with self.condition:
            while self.paused and not self.killed.is_set():
                self.condition.wait(0.05)
            if self.killed.is_set():
                return False
            self.busy += 1
            return True

    def leave(self) -> None:
        with self.condition:
            self.busy -= 1
            self.condition.notify_all()

    def pause(self) -> bool:
        with self.condition:
            self.paused = True
            while self.busy and not self.killed.is_set():
                self.condition.wait(0.05)
            return not self.killed.is_set()

    def resume(self) -> None:
        with self.condition:
            self.paused = False
            self.condition.notify_all()


@dataclass
class Op:
    kind: str  # "put", "batch", "big-batch", "patch", "delete", "clear"
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    keys: list[str]
    values: dict[str, Any] = field(default_factory=dict)  # put: key -> value; patch: key -> merged
    expire_in: float | None = None
    sent: float = 0.0

    def outcome(self, model: dict[str, KeyState], end: float, revision: int | None) -> dict[str, KeyState]:
        """Each key's state if this op was applied, answered (or cut short) at ``end``."""
        if self.kind in ("delete", "clear"):
            return dict.fromkeys(self.keys, GONE)
        if self.kind == "patch":
            (key,) = self.keys
            return {key: KeyState(self.values[key], revision, model[key].expires)}
        window = None
        if self.expire_in is not None:
            window = (self.sent + self.expire_in, end + self.expire_in)
        return {key: KeyState(self.values[key], revision, window) for key in self.keys}


@dataclass
class Tally:
    puts: int = 0
    batches: int = 0
    big_batches: int = 0
    patches: int = 0
    deletes: int = 0
    clears: int = 0
    not_found: int = 0  # PATCH/DELETE answered 404 because the key had expired meanwhile

    @property
    def total(self) -> int:
        return self.puts + self.batches + self.big_batches + self.patches + self.deletes + self.clears

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def count(self, kind: str) -> None:
        name = {"put": "puts", "batch": "batches", "big-batch": "big_batches", "patch": "patches",
                "delete": "deletes", "clear": "clears"}[kind]
        setattr(self, name, getattr(self, name) + 1)


class Client:
    """What writers and the coordinator share: the model, the kill flag, the gate, findings."""

    def __init__(self, server: Server, model: dict[str, KeyState], killed: threading.Event,
                 cycle: int) -> None:
        self.server = server
        self.model = model
        self.killed = killed
        self.gate = Gate(killed)
        self.cycle = cycle
        self.lock = threading.Lock()
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.max_revision = 0
        self.acked: dict[int, Op] = {}
        """Revision -> the acknowledged PUT or PATCH that has it (this cycle's only)."""

    def send(self, connection: http.client.HTTPConnection, op: Op, tally: Tally,
             revisions: list[int]) -> bool:
        """Send ``op``; on an answer, check it and update the model. False once the server is gone.

        ``op.sent`` is set by the caller before the op is marked in flight:
        earlier than the server can read its clock, as the expiry window needs.
        """
        try:
            answer = request(connection, op.method, op.path, op.body, op.headers)
        except (OSError, http.client.HTTPException) as exc:
            if not self.killed.is_set():
                self.error(f"{op.method} {op.path} failed before the kill: {exc!r}")
            return False
        done = time.time()
        acknowledged, revision = self.accept(op, answer, done)
        if acknowledged:
            tally.count(op.kind)
        elif answer.status == 404:
            tally.not_found += 1
        if revision is not None:
            if revisions and revision <= revisions[-1]:
                self.violation(
                    f"{op.kind} acknowledged with revision {revision}, after {revisions[-1]}"
                )
            revisions.append(revision)
            with self.lock:
                self.max_revision = max(self.max_revision, revision)
                if op.kind != "delete":
                    self.acked[revision] = op
        return True

    def accept(self, op: Op, answer: Answer, done: float) -> tuple[bool, int | None]:
        """Check an answer against the model and apply it.

        Returns whether the write was acknowledged (2xx) and the revision it names.
        """
        model = self.model
        if op.kind == "clear":
            if answer.status != 204:
                return self.unexpected(op, answer)
            for key in model:
                model[key] = GONE
            return True, None
        (key,) = op.keys if op.kind in ("put", "patch", "delete") else (None,)
        prior = model[key] if key is not None else GONE
        if op.kind in ("patch", "delete") and answer.status == 404:
            # Only an expiry between the last acknowledged write and now explains it.
            if not prior.may_be_absent(done):
                self.violation(
                    f"{op.kind} of {key!r} answered 404 while it holds {prior.describe()} "
                    "-- an acknowledged write is lost"
                )
            model[key] = GONE
            return False, None
        expected = {"patch": (200,), "delete": (204,), "put": (200, 201)}.get(op.kind, (200,))
        if answer.status not in expected:
            return self.unexpected(op, answer)
        if op.kind in ("patch", "delete") or (op.kind == "put" and answer.status == 200):
            if not prior.may_be_present(op.sent):
                self.violation(
                    f"{op.kind} of {key!r} answered {answer.status} though it is "
                    f"{prior.describe()} -- a deleted or expired key is back"
                )
        if op.kind == "put" and answer.status == 201 and not prior.may_be_absent(done):
            self.violation(
                f"PUT {key!r} answered 201 (created) while it holds {prior.describe()} "
                "-- an acknowledged write is lost"
            )
        if op.kind == "delete":
            model[key] = GONE
            return True, None
        if key is not None:  # PUT /keys/{id}, PATCH: the value back, the revision as ETag
            revision = self.etag(op, answer)
            if answer.json() != {key: op.values[key]}:
                self.error(f"{op.method} {op.path} answered {answer.body[:200]!r}")
        else:
            reply = answer.json()
            revision = reply.get("revision") if isinstance(reply, dict) else None
            if reply.get("stored") != op.keys or not isinstance(revision, int):
                self.error(f"PUT /keys answered {answer.body[:200]!r}")
                revision = None
        model.update(op.outcome(model, done, revision))
        return True, revision

    def etag(self, op: Op, answer: Answer) -> int | None:
        tag = answer.headers.get("etag", "")
        if not re.fullmatch(r'"\d+"', tag):
            self.error(f"{op.method} {op.path} answered ETag {tag!r}")
            return None
        return int(tag[1:-1])

    def unexpected(self, op: Op, answer: Answer) -> tuple[bool, None]:
        self.error(f"{op.method} {op.path} -> {answer.status} {answer.body[:200]!r}")
        return False, None

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(f"cycle {self.cycle}: {text}")

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(f"cycle {self.cycle}: {text}")


class Writer:
    """One thread, one connection, its own keys, one request at a time."""

    def __init__(self, client: Client, number: int, keys: list[str], seed: int) -> None:
        self.client = client
        self.number = number
        self.keys = keys
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.revisions: list[int] = []
        self.in_flight: Op | None = None
        self.counter = 0
        self.thread = threading.Thread(target=self.run, name=f"writer-{number}", daemon=True)

    def run(self) -> None:
        client = self.client
        connection = client.server.connection()
        try:
            while not client.killed.is_set():
                if not client.gate.enter():
                    return
                try:
                    op = self.next_op()
                    op.sent = time.time()
                    self.in_flight = op
                    if not client.send(connection, op, self.tally, self.revisions):
                        return  # no answer: the op stays in flight
                    self.in_flight = None
                finally:
                    client.gate.leave()
        except Exception as exc:  # noqa: BLE001 - a harness bug must show, not hang the cycle
            client.error(f"writer {self.number} crashed: {exc!r}")
        finally:
            connection.close()

    def value(self, pad: int) -> dict[str, Any]:
        self.counter += 1
        return {"w": self.number, "cycle": self.client.cycle, "n": self.counter, "pad": "x" * pad}

    def next_op(self) -> Op:
        rng, model = self.rng, self.client.model
        live = [key for key in self.keys if not model[key].absent]
        roll = rng.random()
        expire_in = round(rng.uniform(0.2, 2.0), 3) if rng.random() < 0.2 else None
        query = f"?expire_in={expire_in}" if expire_in is not None else ""
        if live and roll < 0.15:
            key = rng.choice(live)
            return Op("delete", "DELETE", key_path(key), None, {}, [key])
        if live and roll < 0.35:
            key = rng.choice(live)
            self.counter += 1
            patch: dict[str, Any] = {"n": self.counter, "patched": {"cycle": self.client.cycle}}
            if rng.random() < 0.5:
                patch["pad"] = None if rng.random() < 0.5 else "p" * rng.randint(0, 400)
            merged = merge_patch(model[key].value, patch)
            return Op("patch", "PATCH", key_path(key), json.dumps(patch).encode(),
                      MERGE_PATCH_TYPE, [key], {key: merged})
        if roll < 0.65:
            key = rng.choice(self.keys)
            value = self.value(rng.randint(0, 600))
            return Op("put", "PUT", key_path(key) + query, json.dumps(value).encode(), JSON_TYPE,
                      [key], {key: value}, expire_in)
        if roll < 0.97:
            keys = rng.sample(self.keys, rng.randint(2, 12))
            kind, pad = "batch", 600
        else:  # larger than a segment: the record straddles a roll-over
            keys = list(self.keys)
            rng.shuffle(keys)
            kind, pad = "big-batch", 2000
        values = {key: self.value(rng.randint(pad // 2, pad)) for key in keys}
        return Op(kind, "PUT", "/keys" + query, json.dumps(values).encode(), JSON_TYPE, keys,
                  values, expire_in)


class Coordinator:
    """Sends ``DELETE /keys`` at a random moment, with every writer paused."""

    def __init__(self, client: Client, at: float | None) -> None:
        self.client = client
        self.at = at
        self.in_flight: Op | None = None
        self.tally = Tally()
        self.thread = threading.Thread(target=self.run, name="coordinator", daemon=True)

    def run(self) -> None:
        client = self.client
        if self.at is None or client.killed.wait(self.at):
            return
        if not client.gate.pause():
            return
        connection = client.server.connection()
        try:
            op = Op("clear", "DELETE", "/keys", None, {}, list(client.model), sent=time.time())
            self.in_flight = op
            if client.send(connection, op, self.tally, []):
                self.in_flight = None
        except Exception as exc:  # noqa: BLE001
            client.error(f"coordinator crashed: {exc!r}")
        finally:
            connection.close()
            client.gate.resume()


# --- the loop ----------------------------------------------------------------------------


@dataclass
class Figures:
    cycles: int = 0
    checked: int = 0
    lost: int = 0
    errors: int = 0
    verify_runs: int = 0
    verify_failures: int = 0
    writes: Tally = field(default_factory=Tally)
    kills_mid_compaction: int = 0
    kills_mid_big_batch: int = 0
    kills_mid_clear: int = 0
    kills_with_writes_in_flight: int = 0
    in_flight_applied: int = 0
    torn_tails: int = 0
    compactions: int = 0
    expired_checked: int = 0
    lock_waits: int = 0
    max_lock_wait: float = 0.0
    seconds: float = 0.0
    failure: str | None = None
    final_verify: str = "not run"

    @property
    def passed(self) -> bool:
        return (self.failure is None and self.lost == 0 and self.errors == 0
                and self.verify_failures == 0 and self.final_verify == "ok")


def prepare_directory(directory: Path) -> None:
    """Refuse anything but an empty or absent directory, or one a previous torture made."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        if not (directory / MARKER).is_file():
            raise UsageError(
                f"{directory} is not empty and not a previous `kvd torture` directory "
                f"(no {MARKER} file); refusing to touch it. Give an empty or new directory."
            )
        # Ours from an earlier run: start over (its model is gone with that run).
        shutil.rmtree(directory / DATA, ignore_errors=True)
        for name in (SERVER_LOG, KILLED_LOG):
            (directory / name).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text(
        "made by `kvd torture`; everything here is test data and may be deleted\n"
    )


class Torture:
    """The kill loop over ``directory``; ``run(cycles)`` returns the figures.

    A cycle: writers run against the server, it is SIGKILLed, ``kvd journal
    verify`` checks the directory as the crash left it, a new server starts
    on it and the model is checked against it. That server is the next
    cycle's; after the last cycle it is stopped with SIGTERM (which must exit
    0) and the directory verified once more.
    """

    def __init__(
        self, directory: Path, *, seed: int = 0, writers: int = 4, archive: bool = False,
        fsync: str = "always", min_kill_delay: float = 0.05, max_kill_delay: float = 1.5,
        clear_chance: float = 0.25, settings: dict[str, str] | None = None,
        out: TextIO | None = None,
        between_cycles: Callable[[Torture, int], None] | None = None,
    ) -> None:
        self.directory = directory
        self.data_dir = directory / DATA
        self.seed = seed
        self.rng = random.Random(seed)
        self.writers = writers
        self.min_kill_delay, self.max_kill_delay = min_kill_delay, max_kill_delay
        self.clear_chance = clear_chance
        server_settings = {
            **SERVER_SETTINGS, "KVD_JOURNAL_ARCHIVE": "true" if archive else "false",
            "KVD_JOURNAL_FSYNC": fsync, **(settings or {}),
        }
        self.env = child_environment(server_settings)
        self.tool_env = child_environment({})
        self.out = out if out is not None else sys.stdout
        self.between_cycles = between_cycles
        """Called after each kill, before verify and restart (tests damage the store here)."""
        self.keys = [
            [f"torture/w{number}/k{index:02d}" + (" é/☃" if index % 8 == 7 else "")
             for index in range(KEYS_PER_WRITER)]
            for number in range(writers)
        ]
        self.model: dict[str, KeyState] = {key: GONE for keys in self.keys for key in keys}
        self.pending: list[InFlight] = []
        self.max_revision = 0
        self.verified_head: int | None = None
        self.warned_no_head = False
        """The last seq ``kvd journal verify`` found on disk after the last kill."""
        self.acked: dict[int, Op] = {}
        """The last cycle's acknowledged PUTs and PATCHes by revision."""
        self.figures = Figures()

    def run(self, cycles: int) -> Figures:
        figures = self.figures
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = self.new_server()
        try:
            failure = self.start_and_check(server)
            if failure is None and figures.lost:
                failure = "the store is not the empty one it should be"
            if failure is not None:
                failure = f"first start: {failure}"
            for number in range(1, cycles + 1):
                if failure is not None:
                    break
                self.write_and_kill(server, number)
                failure = self.after_kill(number)
                if failure is None:
                    server = self.new_server()
                    failure = self.start_and_check(server)
                if failure is None and (figures.lost or figures.errors):
                    failure = "acknowledged writes lost or unexpected answers (see above)"
                if failure is not None:
                    failure = f"cycle {number}: {failure}"
                figures.cycles = number
                figures.seconds = time.monotonic() - started
                self.say(
                    f"cycle {number}/{cycles}: {figures.checked} acknowledged writes checked, "
                    f"{figures.lost} lost ({figures.seconds:.0f} s)"
                )
            if failure is None and (failure := self.finish(server)) is not None:
                failure = f"after the last cycle: {failure}"
        finally:
            server.kill()
            figures.seconds = time.monotonic() - started
        if failure is not None:
            figures.failure = failure
            self.say(
                f"stopped: {failure}; the logs are {self.directory / SERVER_LOG} and "
                f"{self.directory / KILLED_LOG}, and {self.data_dir} is left as it was"
            )
        return figures

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def new_server(self) -> Server:
        log = self.directory / SERVER_LOG
        if log.exists():
            log.replace(self.directory / KILLED_LOG)
        return Server(self.data_dir, log, self.env)

    def start_and_check(self, server: Server) -> str | None:
        """Start a server on what the last kill left; check it against the model."""
        try:
            revision = server.start()
        except ServerFailed as exc:
            self.say(f"{exc}:\n{_tail(exc.log)}")
            return str(exc)
        if revision < self.max_revision:
            self.lose(f"/readyz revision {revision} is behind the highest acknowledged revision "
                      f"{self.max_revision} -- acknowledged records are gone")
        if self.verified_head is not None and revision < self.verified_head:
            self.lose(f"/readyz revision {revision} is behind seq {self.verified_head}, the last "
                      "complete record on disk -- start-up dropped records")
        try:
            return self.check(server)
        except (OSError, http.client.HTTPException) as exc:
            return f"the restarted server stopped answering: {exc!r}"

    def after_kill(self, number: int) -> str | None:
        """Between the kill and the restart: what the crash left, and verify on it."""
        figures = self.figures
        waited = wait_unlocked(self.data_dir)
        if waited is None:
            return "the data directory's LOCK was still held 30 s after the kill"
        if waited > 0.001:
            figures.lock_waits += 1
            figures.max_lock_wait = max(figures.max_lock_wait, waited)
        if compaction_evidence(self.data_dir):
            figures.kills_mid_compaction += 1
        if self.between_cycles is not None:
            self.between_cycles(self, number)
        return self.verify()

    def verify(self, final: bool = False) -> str | None:
        figures = self.figures
        result = verify_journal(self.data_dir, self.tool_env)
        figures.verify_runs += 1
        figures.torn_tails += result.torn
        if final:
            figures.final_verify = "ok" if result.ok else "FAILED"
        if not result.ok:
            figures.verify_failures += 1
            figures.final_verify = "FAILED"
            self.say(f"kvd journal verify --data-dir {self.data_dir} failed:\n{result.output}")
            return "kvd journal verify failed"
        self.verified_head = result.head_seq
        if result.head_seq is None and not self.warned_no_head:
            self.warned_no_head = True
            self.say("warning: kvd journal verify printed no 'head: seq N' line; the check that "
                     "the journal reaches every acknowledged revision is skipped")
        if result.head_seq is not None and result.head_seq < self.max_revision:
            self.lose(f"the journal ends at seq {result.head_seq}, before the highest acknowledged "
                      f"revision {self.max_revision} -- acknowledged records are gone")
        return None

    def lose(self, text: str) -> None:
        self.figures.lost += 1
        self.say(f"LOST: {text}")

    def check(self, server: Server) -> str | None:
        """Compare the server with the model; resolve the writes that were in flight."""
        figures = self.figures
        start = time.time()
        answer = server.call("GET", "/keys")
        end = time.time()
        if answer.status != 200:
            return f"GET /keys answered {answer.status} {answer.body[:200]!r}"
        observed = answer.json()
        result = check_state(self.model, self.pending, observed, start, end)
        figures.expired_checked += result.expired_checked
        figures.in_flight_applied += len(result.applied)
        for text in result.violations:
            self.lose(text)
        self.model.update(result.resolved)
        self.pending = []
        # Single reads agree with the listing and carry the revision the model knows
        # (learned here for keys an in-flight write made).
        present = [key for key in self.model if key in observed]
        sample = set(self.rng.sample(present, min(16, len(present))))
        sample |= {key for key in result.applied if key in observed}
        for key in sorted(sample):
            single = server.call("GET", key_path(key))
            state = self.model[key]
            if single.status == 404 and state.may_be_absent(time.time()):
                self.model[key] = GONE  # expired since the listing
                continue
            if single.status != 200 or single.json() != {key: observed[key]}:
                self.lose(f"GET {key!r} answered {single.status} {single.body[:120]!r}; "
                          f"the listing had {_short(observed[key])}")
                continue
            tag = single.headers.get("etag", "")
            revision = int(tag[1:-1]) if re.fullmatch(r'"\d+"', tag) else None
            if state.revision is None:
                self.model[key] = KeyState(state.value, revision, state.expires)
            elif revision != state.revision:
                self.lose(f"GET {key!r} has ETag {tag}, but it was acknowledged at revision "
                          f"{state.revision}")
        return None

    def write_and_kill(self, server: Server, number: int) -> None:
        figures = self.figures
        killed = threading.Event()
        client = Client(server, self.model, killed, number)
        writers = [
            Writer(client, index, self.keys[index], self.rng.randrange(2**32))
            for index in range(self.writers)
        ]
        delay = self.rng.uniform(self.min_kill_delay, self.max_kill_delay)
        clear_at = self.rng.uniform(0, delay) if self.rng.random() < self.clear_chance else None
        coordinator = Coordinator(client, clear_at)
        threads = [writer.thread for writer in writers] + [coordinator.thread]
        for thread in threads:
            thread.start()
        time.sleep(delay)
        killed.set()
        if not server.kill():
            client.error(f"kvd serve died before the kill (exit status {server.process.returncode})"
                         f":\n{_tail(server.log())}")
        killed_at = time.time()
        figures.compactions += server.log().count("compacted:")
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT + 10)
            if thread.is_alive():
                client.error(f"{thread.name} still running after the kill")
        cut_short = [writer.in_flight for writer in writers if writer.in_flight is not None]
        if coordinator.in_flight is not None:
            cut_short.append(coordinator.in_flight)
        self.pending = [
            InFlight(op.kind, op.outcome(self.model, killed_at, None)) for op in cut_short
        ]
        figures.kills_with_writes_in_flight += bool(cut_short)
        figures.kills_mid_big_batch += any(op.kind == "big-batch" for op in cut_short)
        figures.kills_mid_clear += coordinator.in_flight is not None
        tally = Tally()
        for part in [writer.tally for writer in writers] + [coordinator.tally]:
            tally.add(part)
        figures.writes.add(tally)
        figures.checked += tally.total
        self.max_revision = max(self.max_revision, client.max_revision)
        self.acked = dict(client.acked)
        for text in client.violations:
            self.lose(text)
        for text in client.errors:
            self.say(f"ERROR: {text}")
        figures.errors += len(client.errors)

    def finish(self, server: Server) -> str | None:
        """After the last cycle: SIGTERM must drain and exit 0; then verify once more."""
        status = server.stop()
        if status != 0:
            self.figures.errors += 1
            self.say(f"kvd serve exited {status} on SIGTERM:\n{_tail(server.log())}")
            return f"kvd serve exited {status} on SIGTERM"
        return self.verify(final=True)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def report(figures: Figures, command: str) -> str:
    writes = figures.writes
    lines = [
        f"kvd torture: {'PASSED' if figures.passed else 'FAILED'}",
        f"  command:                     {command}",
        f"  cycles (SIGKILLs):           {figures.cycles}",
        f"  acknowledged writes checked: {figures.checked} ({writes.puts} single PUT, "
        f"{writes.batches} batch PUT, {writes.big_batches} large batch PUT, {writes.patches} PATCH, "
        f"{writes.deletes} DELETE, {writes.clears} DELETE /keys)",
        f"  lost:                        {figures.lost}",
        f"  unexpected answers:          {figures.errors}",
        f"  verify:                      {figures.final_verify} "
        f"({figures.verify_runs - figures.verify_failures} of {figures.verify_runs} runs clean: "
        "after each kill, and at the end)",
        f"  kills during a compaction:   {figures.kills_mid_compaction} "
        "(left a snapshot .tmp, an older snapshot or an unretired segment; "
        f"{figures.compactions} compactions completed)",
        f"  kills with writes in flight: {figures.kills_with_writes_in_flight} "
        f"({figures.kills_mid_big_batch} a large batch, {figures.kills_mid_clear} a clear; "
        f"{figures.in_flight_applied} keys found with the in-flight write applied)",
        f"  torn last records found:     {figures.torn_tails}",
        f"  expired keys checked absent: {figures.expired_checked}",
        f"  duration:                    {figures.seconds:.1f} s",
    ]
    if figures.lock_waits:
        lines.append(
            f"  note: LOCK still held after {figures.lock_waits} kills (longest "
            f"{figures.max_lock_wait * 1000:.0f} ms), by the dying snapshot writer"
        )
    if figures.failure:
        lines.append(f"  failure:                     {figures.failure}")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------


DESCRIPTION = """\
SIGKILL a real kvd server again and again under concurrent writers (batch and
single PUTs, PATCH, DELETE, DELETE /keys, expiring keys), with small segments
and constant compaction, and check after every restart that no acknowledged
write was lost, nothing deleted or expired came back, and `kvd journal verify`
passes. Runs against D on your disk: D must be empty, absent, or a directory an
earlier `kvd torture` made (its data is then replaced). The servers run with
the torture's own settings, not the config file's or KVD_* variables; only
the fsync policy comes from --fsync, else from the settings (journal.fsync,
KVD_JOURNAL_FSYNC), else always. Exit status: 0 nothing lost and verify clean,
1 otherwise, 2 usage error or a directory that is not ours."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="F",
                        help="TOML settings file: only journal.fsync is taken from it")
    parser.add_argument("--data-dir", metavar="D", required=True,
                        help="an empty or new directory to torture (on the disk to test)")
    parser.add_argument("--cycles", metavar="N", type=_positive_int, required=True,
                        help="kill-and-restart cycles to run")
    parser.add_argument("--seed", metavar="S", type=int, default=None,
                        help="random seed (default: a random one, printed)")
    parser.add_argument("--writers", metavar="W", type=_positive_int, default=4,
                        help="concurrent writer threads (default 4)")
    parser.add_argument("--archive", action="store_true",
                        help="keep retired segments (journal.archive = true); verify then "
                             "re-reads the whole history each cycle")
    parser.add_argument("--fsync", choices=("always", "everysec", "no"), default=None,
                        help="the servers' fsync policy (default: journal.fsync from the settings); "
                             "a SIGKILL must lose nothing under any of them")
    parser.add_argument("--max-kill-delay", metavar="SECONDS", type=_positive_float, default=1.5,
                        help="kill at a random moment up to this long after writes start "
                             "(default 1.5)")


def build_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``torture`` on ``kvd``'s subcommands."""
    parser = subparsers.add_parser(
        "torture", help="SIGKILL a server under load again and again; check nothing is lost",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``kvd torture`` with parsed arguments; returns the exit status."""
    directory = Path(args.data_dir).absolute()
    try:
        fsync = args.fsync or _configured_fsync(args.config)
        prepare_directory(directory)
    except UsageError as exc:
        print(f"kvd torture: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    command = (
        f"kvd torture --data-dir {args.data_dir} --cycles {args.cycles} --seed {seed} "
        f"--writers {args.writers} --fsync {fsync} --max-kill-delay {args.max_kill_delay}"
        + (" --archive" if args.archive else "")
    )
    print(f"kvd torture: {command}", flush=True)
    torture = Torture(directory, seed=seed, writers=args.writers, archive=args.archive,
                      fsync=fsync, max_kill_delay=args.max_kill_delay)
    try:
        figures = torture.run(args.cycles)
    except KeyboardInterrupt:
        torture.figures.failure = "interrupted"
        print(report(torture.figures, command), flush=True)
        return EXIT_INTERRUPTED
    print(report(figures, command), flush=True)
    return EXIT_OK if figures.passed else EXIT_FAILED


def _configured_fsync(config: str | None) -> str:
    from kvd.config import ConfigError, load_config

    try:
        return load_config(config).journal.fsync
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="kvd torture", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
