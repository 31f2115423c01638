"""kvd.log.nats_durability: start-up warnings when NATS is less durable than journal.fsync asks.

The unit tests pin each branch. The last ones check the facts the warnings
rest on against the real nats-server binary (skipped without one): what its
/varz echoes, what nats-py reports as its version, and that a 2.9 server
refuses the 2.10-only ``sync_interval`` key.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from pathlib import Path

import nats
import pytest
from natsserver import NatsServer, find_nats_server, nats_server  # noqa: F401

from kvd.log.nats_durability import (
    DEFAULT_SYNC_INTERVAL_SECONDS,
    SYNC_ALWAYS_MIN_VERSION,
    durability_warnings,
    parse_server_version,
    supports_sync_always,
    sync_always_from_varz,
)

# --- parse_server_version / supports_sync_always ------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.9.10", (2, 9, 10)),
        ("v2.10.0", (2, 10, 0)),
        ("2.10.0-beta.3", (2, 10, 0)),
        ("2.11.4+build.7", (2, 11, 4)),
        (" 2.12.1 ", (2, 12, 1)),
        ("<nats server v2.9.10>", (2, 9, 10)),  # str(nc.connected_server_version)
        ("<nats server v0.0.0-unknown>", None),
        ("0.0.0-unknown", None),  # nats-py's answer before it has a server INFO
        ("", None),
        ("nats", None),
        ("2.10", None),
    ],
)
def test_parse_server_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_server_version(text) == expected


def test_parse_server_version_of_a_non_string_is_none() -> None:
    assert parse_server_version(None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.9.10", False), ("2.9.25", False), ("2.10.0", True), ("2.10.0-RC.1", True),
     ("3.0.0", True), ("garbage", None)],
)
def test_supports_sync_always(text: str, expected: bool | None) -> None:
    assert supports_sync_always(text) is expected


def test_constants() -> None:
    assert SYNC_ALWAYS_MIN_VERSION == (2, 10, 0)
    assert DEFAULT_SYNC_INTERVAL_SECONDS == 120


# --- sync_always_from_varz ----------------------------------------------------


VARZ_2_9 = {  # /varz of nats-server 2.9.10, trimmed (as captured from the real binary)
    "version": "2.9.10",
    "jetstream": {
        "config": {"max_memory": 18957382656, "max_storage": 62887498752, "store_dir": "/x/jetstream"},
        "stats": {"memory": 0, "storage": 0},
    },
}


def test_varz_of_2_9_has_no_sync_setting() -> None:
    assert sync_always_from_varz(VARZ_2_9) is False


def test_varz_with_sync_always_true() -> None:
    varz = json.loads(json.dumps(VARZ_2_9))
    varz["jetstream"]["config"].update(sync_always=True, sync_interval=120_000_000_000)
    assert sync_always_from_varz(varz) is True


def test_varz_with_sync_always_false_or_missing() -> None:
    varz = json.loads(json.dumps(VARZ_2_9))
    varz["jetstream"]["config"]["sync_interval"] = 1_000_000_000  # 1s, but not always
    assert sync_always_from_varz(varz) is False
    varz["jetstream"]["config"]["sync_always"] = False
    assert sync_always_from_varz(varz) is False


def test_jsz_shape_is_read_too() -> None:
    assert sync_always_from_varz({"config": {"store_dir": "/x", "sync_always": True}}) is True
    assert sync_always_from_varz({"config": {"store_dir": "/x"}}) is False


@pytest.mark.parametrize(
    "varz",
    [{}, {"jetstream": {}}, {"jetstream": {"config": {}}}, {"jetstream": None}, {"version": "2.10.0"}],
)
def test_varz_without_jetstream_config_is_unknown(varz: dict) -> None:
    assert sync_always_from_varz(varz) is None


# --- durability_warnings: argument checks --------------------------------------


@pytest.mark.parametrize("fsync", ["", "ALWAYS", "sometimes", None])
def test_unknown_fsync_policy_is_refused(fsync: object) -> None:
    with pytest.raises(ValueError, match="fsync"):
        durability_warnings("2.9.10", 1, fsync, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("replicas", [0, -1, True, 1.0, "3"])
def test_bad_replicas_are_refused(replicas: object) -> None:
    with pytest.raises(ValueError, match="replicas"):
        durability_warnings("2.9.10", replicas, "always", None)  # type: ignore[arg-type]


# --- durability_warnings: when there is nothing to say -------------------------


@pytest.mark.parametrize("version", ["2.9.10", "2.10.7", "0.0.0-unknown"])
@pytest.mark.parametrize("replicas", [1, 3, 5])
@pytest.mark.parametrize("sync_always", [None, False, True])
def test_fsync_no_never_warns(version: str, replicas: int, sync_always: bool | None) -> None:
    # "no" asks only that a write outlive kvd's process: page cache is enough.
    assert durability_warnings(version, replicas, "no", sync_always) == []


@pytest.mark.parametrize("fsync", ["always", "everysec"])
@pytest.mark.parametrize("replicas", [1, 3, 5])
@pytest.mark.parametrize("version", ["2.10.0", "2.10.22", "2.11.1", "3.0.0"])
def test_sync_always_on_2_10_meets_every_policy(fsync: str, replicas: int, version: str) -> None:
    assert durability_warnings(version, replicas, fsync, True) == []


def test_sync_always_from_an_unknown_version_is_believed() -> None:
    # The operator's /varz says it fsyncs; only the version string was unreadable.
    assert durability_warnings("dev", 3, "always", True) == []


# --- durability_warnings: the warnings -----------------------------------------


def _two(warnings: list[str]) -> tuple[str, str]:
    assert len(warnings) == 2, warnings
    return warnings[0], warnings[1]


@pytest.mark.parametrize("sync_always", [None, False, True])
def test_2_9_always_warns_that_it_acks_before_fsync(sync_always: bool | None) -> None:
    # A 2.9 server cannot fsync before acking, whatever sync_always claims.
    cause, loss = _two(durability_warnings("2.9.10", 1, "always", sync_always))
    assert cause.startswith("journal.fsync=always: nats-server 2.9.10 acks a write before fsyncing")
    assert "every 2 minutes" in cause
    assert "needs nats-server 2.10 or later" in cause
    assert "sync_interval: always" in cause
    assert "everysec" not in cause


def test_r1_loses_acked_writes_on_power_loss_not_on_process_kill() -> None:
    _, loss = _two(durability_warnings("2.9.10", 1, "always", None))
    assert loss.startswith("journal.fsync=always: replicas=1:")
    assert "machine crashing or losing power" in loss
    assert "killed nats-server process loses none" in loss
    assert "2 minutes" in loss


@pytest.mark.parametrize(("replicas", "quorum"), [(3, 2), (5, 3), (2, 2), (4, 3)])
def test_replicated_stream_loses_only_if_a_quorum_fails_together(replicas: int, quorum: int) -> None:
    _, loss = _two(durability_warnings("2.9.10", replicas, "always", None))
    assert loss.startswith(f"journal.fsync=always: replicas={replicas}:")
    assert f"once {quorum} of {replicas} servers have written it (not yet fsynced)" in loss
    assert f"lost only if {quorum} of the NATS servers' machines" in loss
    assert "replicas=1" not in loss


def test_2_10_without_sync_always_says_how_to_set_it() -> None:
    cause, _ = _two(durability_warnings("2.10.7", 3, "always", False))
    assert cause.startswith("journal.fsync=always: nats-server 2.10.7 acks a write before fsyncing")
    assert "/varz jetstream.config has no sync_always" in cause
    assert "set jetstream { sync_interval: always }" in cause
    assert "needs nats-server 2.10" not in cause


def test_2_10_with_unknown_sync_setting_says_it_could_not_tell() -> None:
    cause, _ = _two(durability_warnings("v2.11.0", 1, "always", None))
    assert cause.startswith("journal.fsync=always: could not read whether nats-server 2.11.0")
    assert "jetstream.config.sync_always" in cause
    assert "unless its config has jetstream { sync_interval: always }" in cause


@pytest.mark.parametrize("version", ["0.0.0-unknown", "", "weird"])
@pytest.mark.parametrize("sync_always", [None, False])
def test_unknown_version_assumes_the_default(version: str, sync_always: bool | None) -> None:
    cause, loss = _two(durability_warnings(version, 1, "always", sync_always))
    assert cause.startswith(f"journal.fsync=always: unknown nats-server version {version!r}")
    assert "assuming it acks a write before fsyncing" in cause
    assert "replicas=1" in loss


def test_everysec_on_2_9_warns_without_the_interval_hint() -> None:
    cause, loss = _two(durability_warnings("2.9.10", 1, "everysec", None))
    assert cause.startswith("journal.fsync=everysec: nats-server 2.9.10 acks")
    assert "1s or less" not in cause  # 2.9 cannot be configured at all
    assert loss.startswith("journal.fsync=everysec: replicas=1:")


@pytest.mark.parametrize(("version", "sync_always"), [("2.10.7", False), ("2.10.7", None), ("x", None)])
def test_everysec_on_2_10_mentions_a_short_interval(version: str, sync_always: bool | None) -> None:
    cause, _ = _two(durability_warnings(version, 3, "everysec", sync_always))
    assert cause.startswith("journal.fsync=everysec:")
    assert cause.endswith("(a sync_interval of 1s or less also meets everysec)")


def test_always_never_mentions_everysec() -> None:
    for version, sync_always in [("2.10.7", False), ("2.10.7", None), ("x", None), ("2.9.10", None)]:
        for warning in durability_warnings(version, 3, "always", sync_always):
            assert "everysec" not in warning


# --- the facts, on the real binary ---------------------------------------------


def _version_tuple(binary: str) -> tuple[int, int, int] | None:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return parse_server_version((out.stdout or out.stderr).strip().rsplit("v", 1)[-1])


@pytest.mark.nats
def test_real_server_version_and_varz_feed_the_warnings(nats_server: NatsServer) -> None:  # noqa: F811
    async def connected_version() -> str:
        nc = await nats.connect(nats_server.url)
        try:
            version = nc.connected_server_version
            assert parse_server_version(str(version)) == (version.major, version.minor, version.patch)
            return f"{version.major}.{version.minor}.{version.patch}"
        finally:
            await nc.close()

    version = asyncio.run(connected_version())
    with urllib.request.urlopen(f"{nats_server.monitor_url}/varz", timeout=5) as response:
        varz = json.load(response)
    assert varz["version"].startswith(version)
    sync_always = sync_always_from_varz(varz)
    assert sync_always is not None  # JetStream is on, so its config is echoed
    if not supports_sync_always(version):
        # 2.9: only max_memory, max_storage and store_dir are echoed.
        assert sync_always is False
        assert not {"sync_interval", "sync_always"} & set(varz["jetstream"]["config"])
    else:
        assert sync_always is False  # the harness sets no sync_interval
    assert len(durability_warnings(version, 1, "always", sync_always)) == 2


@pytest.mark.nats
def test_2_9_refuses_the_2_10_sync_key(tmp_path: Path) -> None:
    binary = find_nats_server()
    if binary is None:
        pytest.skip("no nats-server binary")
    version = _version_tuple(binary)
    if version is None or version >= SYNC_ALWAYS_MIN_VERSION:
        pytest.skip(f"nats-server {version} is not a 2.9 server")
    for line in ("sync_interval: always", 'sync_interval: "1s"', "sync: always"):
        conf = tmp_path / "sync.conf"
        conf.write_text(f'listen: "127.0.0.1:-1"\njetstream {{ store_dir: "{tmp_path}/js", {line} }}\n')
        checked = subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=10)
        assert checked.returncode != 0, line
        assert "unknown field" in checked.stderr + checked.stdout
