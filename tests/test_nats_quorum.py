"""kvd.log.nats.stream_has_quorum: when /readyz may say NATS confirms writes again.

A stream leader that just lost its peers still answers ``stream_info`` for a
few seconds; readiness must wait until the leader hears from a majority.
The end-to-end case (two of three servers killed) is in test_nats_cluster.py.
"""

from __future__ import annotations

import pytest
from nats.js.api import ClusterInfo, PeerInfo, StreamInfo

from kvd.log.nats import PEER_SILENT_NS, stream_has_quorum


def info(cluster: ClusterInfo | None) -> StreamInfo:
    return StreamInfo(config=None, state=None, cluster=cluster)


def peer(current: bool = True, offline: bool = False, active: int = 100_000_000) -> PeerInfo:
    return PeerInfo(name="n", current=current, offline=offline, active=active)


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        (None, True),  # a single server, no cluster
        (ClusterInfo(leader="n1"), True),  # R1 in a cluster
        (ClusterInfo(leader=None), False),
        (ClusterInfo(leader="n1", replicas=[peer(), peer()]), True),
        (ClusterInfo(leader="n1", replicas=[peer(), peer(current=False)]), True),  # 2 of 3
        (ClusterInfo(leader="n1", replicas=[peer(current=False), peer(current=False)]), False),
        (ClusterInfo(leader="n1", replicas=[peer(offline=True), peer(offline=True)]), False),
        (ClusterInfo(leader="n1", replicas=[peer(active=PEER_SILENT_NS + 1), peer(current=False)]), False),
        (ClusterInfo(leader=None, replicas=[peer(), peer()]), False),
        (ClusterInfo(leader="n1", replicas=[peer(), peer(), peer(False), peer(False)]), True),  # 3 of 5
        (ClusterInfo(leader="n1", replicas=[peer(), peer(False), peer(False), peer(False)]), False),
    ],
)
def test_a_stream_has_quorum_when_its_leader_hears_a_majority(cluster, expected):
    assert stream_has_quorum(info(cluster)) is expected


def test_a_replica_counts_only_if_heard_within_the_window():
    """The probe narrows the window to 'since its first answer': a peer killed just
    before the node reconnected was heard 1.5 s ago, inside the default 3 s."""
    cluster = ClusterInfo(leader="n1", replicas=[peer(active=1_500_000_000), peer(current=False)])
    assert stream_has_quorum(info(cluster)) is True
    assert stream_has_quorum(info(cluster), heard_within_ns=1_000_000_000) is False
    assert stream_has_quorum(info(cluster), heard_within_ns=0) is False
    single = ClusterInfo(leader="n1")  # no replicas to hear from: the leader alone decides
    assert stream_has_quorum(info(single), heard_within_ns=0) is True
