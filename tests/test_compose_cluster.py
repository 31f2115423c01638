"""docker-compose.cluster.yml and config/cluster/ stay consistent, without Docker.

What can be checked here: the compose file parses; every file it mounts
exists; each kvd node has its own /data volume and the NATS settings; every
NATS URL kvd is given is a nats service listening there; the NATS config is
accepted by the local nats-server (``-t``); the HAProxy config sends traffic
to every kvd node, checks ``/readyz``, and is accepted by ``haproxy -c``
when HAProxy is installed. The environment the compose file gives kvd is run
through kvd's own config loader.

nats-server 2.9 does not know ``sync_interval`` (2.10+), which the cluster
config sets on purpose (docs/nats.md): with a 2.9 binary the test checks
that it is exactly that key it refuses, and that the rest is valid.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from natsserver import find_nats_server

from kvd.config import load_config
from kvd.log.nats_durability import SYNC_ALWAYS_MIN_VERSION, parse_server_version

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.cluster.yml"
NATS_CONF = REPO / "config" / "cluster" / "nats.conf"
HAPROXY_CFG = REPO / "config" / "cluster" / "haproxy.cfg"
DOCKERFILE = REPO / "Dockerfile"
DOCS = REPO / "docs" / "nats.md"

KVD_PORT = 8000
NATS_URL = re.compile(r"nats://([A-Za-z0-9_.-]+):(\d+)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _kvd_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("image") == "kvd:latest"}


def _nats_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if str(s.get("image", "")).startswith("nats:")}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    mounts = []
    for entry in service.get("volumes") or []:
        source, target, *_ = entry.split(":")
        mounts.append((source, target))
    return mounts


def _nats_conf_value(key: str, text: str | None = None) -> str:
    text = NATS_CONF.read_text() if text is None else text
    match = re.search(rf"^\s*{re.escape(key)}\s*[:=]\s*\"?([^\"\s#]+)\"?", text, re.MULTILINE)
    assert match, f"{key} not in {NATS_CONF}"
    return match.group(1)


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def _haproxy_sections() -> dict[str, list[str]]:
    """``"backend kvd_ready"`` -> its lines (comments and blanks dropped)."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not raw[0].isspace():
            current = " ".join(line.split())
            sections[current] = []
        elif current is not None:
            sections[current].append(" ".join(line.split()))
    return sections


def _health_path(lines: list[str]) -> str | None:
    for line in lines:
        match = re.fullmatch(r"http-check send meth GET uri (\S+)", line) or re.fullmatch(
            r"option httpchk GET (\S+)", line
        )
        if match:
            return match.group(1)
    return None


def _servers(lines: list[str]) -> dict[str, str]:
    """server name -> address of each checked ``server`` line."""
    found = {}
    for line in lines:
        words = line.split()
        if words[0] == "server":
            assert "check" in words[3:], f"server {words[1]} is not health-checked"
            found[words[1]] = words[2]
    return found


# --- the compose file ----------------------------------------------------------


def test_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(_kvd_services(services)) == {"kvd-1", "kvd-2", "kvd-3"}
    assert set(_nats_services(services)) == {"nats-1", "nats-2", "nats-3"}
    assert "lb" in services


def test_mounted_files_exist(services: dict[str, dict[str, Any]]) -> None:
    binds = [
        source for service in services.values() for source, _ in _mounts(service)
        if source.startswith((".", "/"))
    ]
    assert binds, "no config file is mounted"
    for source in binds:
        assert (REPO / source).is_file(), f"{source} does not exist"
    assert {(REPO / s).resolve() for s in binds} == {NATS_CONF.resolve(), HAPROXY_CFG.resolve()}


def test_named_volumes_are_declared_and_not_shared(compose: dict[str, Any], services) -> None:
    named = [
        source for service in services.values() for source, _ in _mounts(service)
        if not source.startswith((".", "/"))
    ]
    assert len(named) == len(set(named)), "two services share a volume"
    assert set(named) <= set(compose.get("volumes") or {})


def test_each_kvd_node_is_the_runtime_image_with_its_own_data_volume(services) -> None:
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE)
    seen = set()
    for name, service in _kvd_services(services).items():
        build = service["build"]
        assert build["context"] == "." and build["target"] in stages and build["target"] == "runtime"
        data = [source for source, target in _mounts(service) if target == "/data"]
        assert len(data) == 1, f"{name} needs exactly one volume on /data"
        assert data[0] not in seen
        seen.add(data[0])
        assert service.get("stop_signal") == "SIGTERM"


def test_the_image_keeps_its_journal_in_data() -> None:
    # The volumes above only hold the journal because the image points kvd there.
    text = DOCKERFILE.read_text()
    runtime = text[text.index("AS runtime"):]
    assert re.search(r"KVD_JOURNAL_DATA_DIR=/data\b", runtime)
    assert re.search(r"KVD_SERVER_HOST=0\.0\.0\.0\b", runtime)
    assert re.search(rf"^EXPOSE\s+{KVD_PORT}\b", runtime, re.MULTILINE)


def test_kvd_environment(services) -> None:
    nats = set(_nats_services(services))
    for name, service in _kvd_services(services).items():
        env = _environment(service)
        assert env["KVD_JOURNAL_BACKEND"] == "nats", name
        assert env["KVD_JOURNAL_NATS_REPLICAS"] == "3", name
        urls = [url.strip() for url in env["KVD_JOURNAL_NATS_SERVERS"].split(",")]
        hosts = []
        for url in urls:
            match = NATS_URL.fullmatch(url)
            assert match, f"{name}: {url!r} is not nats://host:port"
            hosts.append(match.group(1))
            assert int(match.group(2)) == _port(_nats_conf_value("listen"))
        assert sorted(hosts) == sorted(nats), f"{name} must list every NATS server"


def test_kvd_accepts_that_environment(services, tmp_path: Path) -> None:
    empty = tmp_path / "kvd.toml"
    empty.write_text("")
    image_env = dict(re.findall(r"(KVD_[A-Z_]+)=(\S+)", DOCKERFILE.read_text().split("AS runtime", 1)[1]))
    for service in _kvd_services(services).values():
        config = load_config(empty, environ={**image_env, **_environment(service)})
        assert config.journal.backend == "nats"
        assert config.journal.nats.replicas == 3
        assert config.journal.nats.servers == [f"nats://{n}:4222" for n in ("nats-1", "nats-2", "nats-3")]
        assert config.journal.nats.stream == "KVD"
        assert config.journal.data_dir == "/data"
        assert config.server.host == "0.0.0.0" and config.server.port == KVD_PORT


def test_kvd_waits_for_healthy_nats(services) -> None:
    nats = set(_nats_services(services))
    for name, service in _kvd_services(services).items():
        depends = service["depends_on"]
        assert set(depends) == nats, name
        assert all(d["condition"] == "service_healthy" for d in depends.values())


def test_nats_services(services) -> None:
    names = []
    store_dir = _nats_conf_value("store_dir")
    monitor_port = _port(_nats_conf_value("http"))
    for name, service in _nats_services(services).items():
        env = _environment(service)
        names.append(env["NATS_SERVER_NAME"])
        assert env["NATS_SERVER_NAME"] == name  # routes and /varz use the service name
        mounts = dict((target, source) for source, target in _mounts(service))
        assert mounts[store_dir].startswith(name), f"{name}: its own volume on {store_dir}"
        conf_target = next(t for t, s in mounts.items() if Path(s).name == NATS_CONF.name)
        assert service["command"][-2:] == ["--config", conf_target]
        assert f"127.0.0.1:{monitor_port}/healthz" in " ".join(service["healthcheck"]["test"])
        assert "ports" not in service  # only kvd talks to NATS
    assert len(set(names)) == 3


def test_nats_routes_name_every_nats_service(services) -> None:
    text = NATS_CONF.read_text()
    cluster = text[text.index("cluster {"):]
    cluster_port = _port(_nats_conf_value("listen", cluster))
    routes = re.findall(r"nats-route://([A-Za-z0-9_.-]+):(\d+)", cluster)
    assert sorted(host for host, _ in routes) == sorted(_nats_services(services))
    assert {int(port) for _, port in routes} == {cluster_port}
    assert "$NATS_SERVER_NAME" in text


def test_nats_image_supports_the_config(services) -> None:
    # sync_interval is 2.10+ (nats-server 2.9 refuses to start with it).
    if re.search(r"^\s*sync_interval\s*:", NATS_CONF.read_text(), re.MULTILINE):
        for name, service in _nats_services(services).items():
            tag = service["image"].split(":", 1)[1]
            version = re.match(r"(\d+)\.(\d+)", tag)
            assert version, f"{name}: pin at least the minor version, not {tag!r}"
            assert (int(version[1]), int(version[2])) >= SYNC_ALWAYS_MIN_VERSION[:2], name
        text = DOCS.read_text()
        assert "sync_interval: always" in text and "2.10" in text  # documented why


def test_load_balancer(services) -> None:
    lb = services["lb"]
    assert f"127.0.0.1:{KVD_PORT}:{KVD_PORT}" in [str(p) for p in lb["ports"]]  # auth is off by default
    assert ("./config/cluster/haproxy.cfg", "/usr/local/etc/haproxy/haproxy.cfg") in _mounts(lb)
    assert set(lb["depends_on"]) == set(_kvd_services(services))


# --- the HAProxy config ------------------------------------------------------------


def test_haproxy_routes_to_every_ready_kvd_node(services) -> None:
    sections = _haproxy_sections()
    frontend = next(lines for name, lines in sections.items() if name.startswith("frontend "))
    assert f"bind :{KVD_PORT}" in frontend
    default = next(line.split()[1] for line in frontend if line.startswith("default_backend "))
    backend = sections[f"backend {default}"]
    assert "option httpchk" in " ".join(backend)
    assert _health_path(backend) == "/readyz"
    assert "http-check expect status 200" in backend
    expected = {name: f"{name}:{KVD_PORT}" for name in _kvd_services(services)}
    assert _servers(backend) == expected


def test_haproxy_falls_back_to_live_nodes_only_when_none_is_ready(services) -> None:
    sections = _haproxy_sections()
    frontend = next(lines for name, lines in sections.items() if name.startswith("frontend "))
    default = next(line.split()[1] for line in frontend if line.startswith("default_backend "))
    fallbacks = [line for line in frontend if line.startswith("use_backend ")]
    assert fallbacks == [f"use_backend kvd_degraded if {{ nbsrv({default}) eq 0 }}"]
    degraded = sections["backend kvd_degraded"]
    assert _health_path(degraded) == "/healthz"
    assert _servers(degraded) == {name: f"{name}:{KVD_PORT}" for name in _kvd_services(services)}


def test_haproxy_starts_before_the_kvd_containers_resolve() -> None:
    defaults = _haproxy_sections()["defaults"]
    server_defaults = next(line for line in defaults if line.startswith("default-server "))
    assert "init-addr last,libc,none" in server_defaults
    assert "resolvers docker" in server_defaults


def test_haproxy_accepts_the_config() -> None:
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    checked = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr


# --- the NATS config, on the local nats-server -----------------------------------------


def _nats_check(binary: str, conf: Path, server_name: str | None = "nats-1") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_SERVER_NAME"}
    if server_name is not None:
        env["NATS_SERVER_NAME"] = server_name
    return subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30, env=env)


@pytest.fixture(scope="module")
def nats_binary() -> tuple[str, tuple[int, int, int]]:
    binary = find_nats_server()
    if binary is None:
        pytest.skip("no nats-server binary (apt-get install nats-server)")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    version = parse_server_version((out.stdout or out.stderr).strip().rsplit("v", 1)[-1])
    assert version is not None, out
    return binary, version


@pytest.mark.nats
def test_nats_config_is_valid(nats_binary, tmp_path: Path) -> None:
    binary, version = nats_binary
    if version >= SYNC_ALWAYS_MIN_VERSION:
        checked = _nats_check(binary, NATS_CONF)
        assert checked.returncode == 0, checked.stderr
        return
    # 2.9: the one 2.10-only key is refused by name, and everything else is valid.
    checked = _nats_check(binary, NATS_CONF)
    assert checked.returncode != 0
    assert 'unknown field "sync_interval"' in checked.stderr
    without = tmp_path / "nats-2.9.conf"
    without.write_text(re.sub(r"^\s*sync_interval\s*:.*$", "", NATS_CONF.read_text(), flags=re.MULTILINE))
    checked = _nats_check(binary, without)
    assert checked.returncode == 0, checked.stderr
    assert "is valid" in checked.stderr + checked.stdout


@pytest.mark.nats
def test_nats_config_needs_the_server_name(nats_binary) -> None:
    binary, _ = nats_binary
    checked = _nats_check(binary, NATS_CONF, server_name=None)
    assert checked.returncode != 0
    assert "NATS_SERVER_NAME" in checked.stderr


@pytest.mark.nats
def test_nats_config_check_catches_a_bad_key(nats_binary, tmp_path: Path) -> None:
    # The validation above means something: an unknown key fails it.
    binary, _ = nats_binary
    broken = tmp_path / "broken.conf"
    broken.write_text(NATS_CONF.read_text().replace("jetstream {", "jetstream {\n  no_such_key: 1", 1))
    checked = _nats_check(binary, broken)
    assert checked.returncode != 0
    assert 'unknown field "no_such_key"' in checked.stderr
