"""Start-up warnings for a NATS journal whose durability is weaker than ``journal.fsync`` asks.

kvd answers a write once NATS JetStream has acknowledged it. With the file
backend, ``fsync = "always"`` means an answered write is on disk; with NATS
it means only what the server does before its ack, and by default that is
*not* an fsync:

* JetStream writes the message to its block file (``write(2)``, so into the
  page cache) and acks; it fsyncs in the background, every 2 minutes by
  default. Verified on nats-server 2.9.10 by tracing its system calls: the
  block file was first fsynced 2 minutes after the stream was created, not
  before any ack (docs/nats.md, "Durability").
* An acknowledged write therefore survives the server *process* dying
  (SIGKILL, OOM), but not its machine crashing or losing power within that
  window. On an R3 (R5) stream the ack waits for a quorum, 2 of 3 (3 of 5),
  to hold the entry, but again only in their page caches: it is lost only if
  a quorum of machines goes down together (one power feed, one host).
* Only nats-server 2.10 and later can be told to fsync before acking:
  ``jetstream { sync_interval: always }`` (2.9 rejects the key at start-up),
  echoed as ``"sync_always": true`` in ``/varz`` ``jetstream.config``.

:func:`durability_warnings` says, as log lines, where the server's setup
falls short of the ``journal.fsync`` policy, so an operator who chose
"always" learns that NATS does not give it. It is pure: the caller finds the
server version (``nc.connected_server_version``), the stream's *actual*
replica count (``StreamInfo.config.num_replicas``, not the configured one,
which only applies when kvd creates the stream) and, if it can read the
server's ``/varz``, the sync setting (:func:`sync_always_from_varz`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_SYNC_INTERVAL_SECONDS",
    "SYNC_ALWAYS_MIN_VERSION",
    "durability_warnings",
    "parse_server_version",
    "supports_sync_always",
    "sync_always_from_varz",
]

SYNC_ALWAYS_MIN_VERSION = (2, 10, 0)
"""The first nats-server release with ``jetstream { sync_interval: ... }``."""

DEFAULT_SYNC_INTERVAL_SECONDS = 120
"""JetStream's background fsync interval when none is configured (2 minutes)."""

_FSYNC_POLICIES = ("always", "everysec", "no")
_VERSION = re.compile(r"(?<![\d.])(\d+)\.(\d+)\.(\d+)")


def parse_server_version(server_version: str) -> tuple[int, int, int] | None:
    """``"2.9.10"`` (or ``"v2.10.0-beta.1"``) as ``(2, 9, 10)``; None when not a version.

    Also reads ``str(nc.connected_server_version)``, which nats-py renders as
    ``<nats server v2.9.10>``. nats-py reports ``0.0.0-unknown`` before it has
    a server's INFO: that is None too.
    """
    match = _VERSION.search(server_version) if isinstance(server_version, str) else None
    if match is None:
        return None
    version = (int(match[1]), int(match[2]), int(match[3]))
    return None if version == (0, 0, 0) else version


def supports_sync_always(server_version: str) -> bool | None:
    """Whether that server version accepts ``sync_interval: always``; None if unknown."""
    version = parse_server_version(server_version)
    return None if version is None else version >= SYNC_ALWAYS_MIN_VERSION


def sync_always_from_varz(varz: Mapping[str, Any]) -> bool | None:
    """``sync_always`` from a server's ``/varz`` (or ``/jsz``) JSON; None when it cannot tell.

    2.10+ echoes ``jetstream.config.sync_always`` (JSON ``omitempty``: the key
    is there only when true). 2.9 has no such setting and echoes only
    ``max_memory``, ``max_storage`` and ``store_dir``: False. No JetStream
    config at all (JetStream off, or not this server's answer): None.
    """
    jetstream = varz.get("jetstream")
    config = jetstream.get("config") if isinstance(jetstream, Mapping) else varz.get("config")
    if not isinstance(config, Mapping) or not config:
        return None
    return bool(config.get("sync_always", False))


def durability_warnings(
    server_version: str, replicas: int, fsync: str, sync_always: bool | None
) -> list[str]:
    """The warnings to log at start-up when the NATS stream is less durable than ``fsync`` asks.

    ``server_version``: the connected nats-server's version (``"2.9.10"``).
    ``replicas``: the stream's replica count. ``fsync``: kvd's
    ``journal.fsync``. ``sync_always``: whether the server fsyncs before it
    acks (``/varz`` ``jetstream.config.sync_always``); None when unknown.
    A 2.9 server never does, whatever ``sync_always`` says.

    ``fsync = "no"`` asks only that an answered write outlive kvd's process,
    which JetStream always gives: no warnings. ``"always"`` asks that it
    outlive an OS crash or power loss, ``"everysec"`` that at most about a
    second of writes be lost then; JetStream without ``sync_always`` fsyncs
    every 2 minutes, so both are weaker on R1 (one machine) and, less so, on
    R3/R5 (a quorum of machines failing together). An empty list means the
    setup meets the policy as far as these facts can tell.
    """
    if fsync not in _FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {', '.join(_FSYNC_POLICIES)}, not {fsync!r}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, not {replicas!r}")
    if fsync == "no":
        return []

    version = parse_server_version(server_version)
    capable = None if version is None else version >= SYNC_ALWAYS_MIN_VERSION
    if capable is False:
        sync_always = False  # 2.9 and older cannot fsync before the ack
    if sync_always:
        return []

    shown = server_version if version is None else ".".join(map(str, version))
    head = f"journal.fsync={fsync}"
    interval = f"every {DEFAULT_SYNC_INTERVAL_SECONDS // 60} minutes by default"
    if capable is False:
        cause = (
            f"{head}: nats-server {shown} acks a write before fsyncing it (it fsyncs {interval}); "
            f"fsync before the ack, jetstream {{ sync_interval: always }}, needs nats-server 2.10 "
            f"or later ({shown} refuses to start with that key)"
        )
    elif capable is None:
        cause = (
            f"{head}: unknown nats-server version {shown!r}: assuming it acks a write before "
            f"fsyncing it (JetStream fsyncs {interval} unless 2.10+ has "
            f"jetstream {{ sync_interval: always }})"
        )
    elif sync_always is None:
        cause = (
            f"{head}: could not read whether nats-server {shown} fsyncs before acking "
            f"(/varz jetstream.config.sync_always); unless its config has "
            f"jetstream {{ sync_interval: always }}, it acks first and fsyncs {interval}"
        )
    else:
        cause = (
            f"{head}: nats-server {shown} acks a write before fsyncing it (/varz "
            f"jetstream.config has no sync_always; it fsyncs {interval}); set "
            f"jetstream {{ sync_interval: always }} in the server's config"
        )
    if fsync == "everysec" and capable is not False:
        cause += " (a sync_interval of 1s or less also meets everysec)"

    if replicas == 1:
        loss = (
            f"{head}: replicas=1: the NATS server's machine crashing or losing power can lose "
            f"the acknowledged writes of the last sync interval (up to "
            f"{DEFAULT_SYNC_INTERVAL_SECONDS // 60} minutes by default); a killed nats-server "
            f"process loses none"
        )
    else:
        quorum = replicas // 2 + 1
        loss = (
            f"{head}: replicas={replicas}: a write is acknowledged once {quorum} of {replicas} "
            f"servers have written it (not yet fsynced), so acknowledged writes are lost only if "
            f"{quorum} of "
            f"the NATS servers' machines crash or lose power together (one host for all of "
            f"them, one power feed)"
        )
    return [cause, loss]
