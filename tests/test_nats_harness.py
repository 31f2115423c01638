"""The nats-server harness (tests/natsserver.py) works: JetStream on one server and on a cluster."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.errors import APIError
from natsserver import NatsCluster, NatsServer, nats_cluster, nats_server  # noqa: F401

pytestmark = pytest.mark.slow

WRONG_LAST_SEQUENCE = 10071


def test_expected_last_sequence_refuses_a_stale_writer(nats_server: NatsServer) -> None:  # noqa: F811
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="J", subjects=["j.>"]))
            first = await js.publish("j.a", b"1", headers={"Nats-Expected-Last-Sequence": "0"})
            second = await js.publish("j.a", b"2", headers={"Nats-Expected-Last-Sequence": "1"})
            assert (first.seq, second.seq) == (1, 2)
            with pytest.raises(APIError) as refused:
                await js.publish("j.a", b"stale", headers={"Nats-Expected-Last-Sequence": "1"})
            assert refused.value.err_code == WRONG_LAST_SEQUENCE
            assert (await js.stream_info("J")).state.messages == 2
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_restart_keeps_the_stream(nats_server: NatsServer) -> None:  # noqa: F811
    async def fill() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="K", subjects=["k.>"]))
        for i in range(20):
            await js.publish(f"k.{i}", str(i).encode())
        await nc.close()

    async def read() -> list[bytes]:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        assert (await js.stream_info("K")).state.messages == 20
        data = [(await js.get_msg("K", seq)).data for seq in range(1, 21)]
        await nc.close()
        return data

    asyncio.run(fill())
    ports = (nats_server.client_port, nats_server.cluster_port, nats_server.monitor_port)
    old_pid = nats_server.pid
    nats_server.restart()
    assert nats_server.pid != old_pid
    assert (nats_server.client_port, nats_server.cluster_port, nats_server.monitor_port) == ports
    assert asyncio.run(read()) == [str(i).encode() for i in range(20)]
    assert (nats_server.store_dir / "jetstream").is_dir()


async def ignore(error: Exception) -> None:
    """nats-py logs connection errors (the killed server) unless given an error callback."""


async def publish_until_acked(js, subject: str, payload: bytes, msg_id: str, deadline: float):  # noqa: ANN001, ANN201
    """Retry through leader elections; the Nats-Msg-Id makes a retried publish store once."""
    while True:
        try:
            return await js.publish(subject, payload, timeout=1.0, headers={"Nats-Msg-Id": msg_id})
        except (nats.errors.Error, APIError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_cluster_survives_losing_the_stream_leader(nats_cluster: NatsCluster) -> None:  # noqa: F811
    before, after = 200, 50

    async def scenario() -> None:
        nc = await nats.connect(nats_cluster.urls, reconnect_time_wait=0.1,
                                max_reconnect_attempts=-1, error_cb=ignore)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="R", subjects=["r.>"], num_replicas=3))
            for i in range(before):
                await js.publish("r.x", f"{i}".encode(), headers={"Nats-Msg-Id": f"m{i}"})

            victim = nats_cluster.stream_leader("R")
            assert victim is not None
            nats_cluster.kill(victim)
            deadline = time.monotonic() + 15
            for i in range(before, before + after):
                await publish_until_acked(js, "r.x", f"{i}".encode(), f"m{i}", deadline)
            new_leader = nats_cluster.stream_leader("R")
            assert new_leader not in (None, victim)

            nats_cluster.restart(victim)
            total = before + after
            assert (await js.stream_info("R")).state.messages == total
            data = [(await js.get_msg("R", seq)).data for seq in range(1, total + 1)]
            assert data == [f"{i}".encode() for i in range(total)]

            # restart() waited for /healthz ("current"); the replica may still be
            # applying its last entries, so its own count can trail for a moment.
            replica = nats_cluster.servers[victim]
            deadline = time.monotonic() + 5
            while stream_messages(replica, "R") != total:
                assert time.monotonic() < deadline, replica.log_tail()
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    asyncio.run(scenario())


def stream_messages(server: NatsServer, stream: str) -> int | None:
    """The message count ``server``'s own replica of ``stream`` holds, from its /jsz."""
    for account in server.jsz(accounts="true", streams="true").get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") == stream:
                return detail["state"]["messages"]
    return None
