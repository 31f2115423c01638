"""Run one kvd server: lock, listen, replay, serve, and on SIGTERM drain and flush.

The listening socket opens before replay so that orchestrators see a live
process: ``/healthz`` answers at once, ``/readyz`` and ``/keys`` answer 503
until the journal has been replayed.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable

import pluggy
from tornado.netutil import bind_sockets

from kvd.app import AppContext, PeriodicTask
from kvd.config import Config, ConfigError
from kvd.handlers import KvdApplication, make_app
from kvd.handlers.framing import KvdHTTPServer
from kvd.handlers.wire import Wire
from kvd.log.compaction import CompactionPolicy, Compactor
from kvd.log.file import FileJournal
from kvd.log.journal import StartupRefused
from kvd.log.lock import DataDirLock, DataDirLocked
from kvd.log.reader import JournalCorrupt
from kvd.log.snapshot import SnapshotCorrupt
from kvd.plugins import make_plugin_manager
from kvd.store import Store

log = logging.getLogger("kvd.app")

EXIT_OK = 0
EXIT_FAILURE = 1


async def serve(config: Config, plugins: pluggy.PluginManager | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit status."""
    # A file-size limit must fail the write (EFBIG -> 503), not kill the server.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Context and app first: neither touches the disk or the network, and a plugin
    # may refuse the route table (ConfigError, exit 2) before anything is created.
    ctx = build_context(config, plugins)
    try:
        app = make_app(ctx)
    except ConfigError:
        _close_unopened(ctx)
        raise
    lock = DataDirLock(config.data_dir)
    try:
        lock.acquire()
    except DataDirLocked as exc:
        log.error("%s", exc)
        _close_unopened(ctx)
        return EXIT_FAILURE
    except OSError as exc:  # not writable by this user (a root-owned bind mount), or not a directory
        log.error("cannot use data directory %s: %s", config.data_dir, _os_error(exc))
        _close_unopened(ctx)
        return EXIT_FAILURE
    try:
        return await _serve_locked(ctx, app)
    finally:
        lock.release()


def _close_unopened(ctx: AppContext) -> None:
    if ctx.journal is not None:
        ctx.journal.close_sync()


def _log_plugins(config: Config) -> None:
    """Say which plugins run, and warn of settings that do nothing: tokens configured for an
    auth plugin left out of ``enabled`` would otherwise leave the server open without a sign."""
    enabled = config.plugins.enabled
    log.info("plugins: %s", ", ".join(enabled) if enabled else "none")
    for name in sorted(set(config.plugins.settings) - set(enabled)):
        log.warning(
            "[plugins.%s] settings are ignored: %r is not in plugins.enabled%s", name, name,
            " (requests are served without tokens)" if name == "auth" else "",
        )


def _os_error(exc: OSError) -> str:
    """``Permission denied: '/data/LOCK'``: what failed and on which file, without a traceback."""
    return f"{exc.strerror or exc}: {exc.filename!r}" if exc.filename else str(exc.strerror or exc)


def build_context(config: Config, plugins: pluggy.PluginManager | None = None) -> AppContext:
    """Plugins, store and journal wired together; the journal is not replayed yet."""
    if plugins is None:
        plugins = make_plugin_manager(config)
    store = Store()
    ctx = AppContext(config=config, store=store, plugins=plugins)
    synced = plugins.hook.journal_synced

    def observe_sync(seconds: float, records: int, nbytes: int) -> None:
        try:
            synced(seconds=seconds, records=records, nbytes=nbytes)
        except Exception as exc:
            log.exception("journal_synced hook failed")
            ctx.report_error("hook_journal_synced", exc)

    common = {
        "segment_bytes": config.journal.segment_bytes,
        "archive": config.journal.archive,
        "on_commit": store.apply,
        "on_restore": store.restore,
        "on_replay_puts": store.replay_puts,
        "on_abort": store.abort_pending,
    }
    journal: FileJournal
    if config.journal.backend == "nats":
        from kvd.log.nats import NatsJournal  # nats-py is only needed for this backend

        journal = NatsJournal(
            config.data_dir, settings=config.journal.nats, fsync_policy=config.journal.fsync,
            on_note=store.note_record, on_reset=store.reset, **common,
        )
    else:
        journal = FileJournal(
            config.data_dir, fsync=config.journal.fsync, seal_segments=config.journal.seal_segments,
            on_synced=observe_sync, **common
        )
    store.attach(journal)
    ctx.journal = journal
    ctx.compactor = Compactor(
        journal,
        store,
        CompactionPolicy(config.journal.compact_dead_ratio, config.journal.compact_min_dead_bytes),
    )
    return ctx


def mark_ready(ctx: AppContext) -> None:
    """After replay: serve, tell plugins, start their background tasks and compaction checks."""
    ctx.store.finish_replay()
    if ctx.journal is not None:
        ctx.journal.serving()
    ctx.plugins.hook.startup(ctx=ctx)
    ctx.start_periodic_tasks()
    if ctx.compactor is not None:
        ctx.add_periodic_task(
            PeriodicTask("compaction", ctx.config.journal.compact_check_seconds, ctx.compactor.maybe_compact)
        )


async def _serve_locked(ctx: AppContext, app: KvdApplication) -> int:
    loop = asyncio.get_running_loop()
    config = ctx.config
    store, journal, plugins = ctx.store, ctx.journal, ctx.plugins
    assert isinstance(journal, FileJournal)

    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    settings = config.server
    try:
        tls = _tls_context(settings.certfile, settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot load TLS certificate or key: %s", exc)
        journal.close_sync()
        return EXIT_FAILURE
    server = KvdHTTPServer(
        app,
        ssl_options=tls,
        max_header_size=settings.max_header_bytes,
        idle_connection_timeout=settings.idle_timeout,
        # body_timeout is kvd's own (kvd.handlers.deadline): tornado's costs loop passes
    )
    try:
        sockets = bind_sockets(config.server.port, config.server.host, family=socket.AF_UNSPEC)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.server.host, config.server.port, exc.strerror)
        journal.close_sync()
        return EXIT_FAILURE
    wire = Wire(app, server) if tls is None and settings.fast_wire else None  # plain HTTP only
    if wire is not None:
        wire.listen(sockets)
    else:
        server.add_sockets(sockets)
    host, port = sockets[0].getsockname()[:2]
    scheme = "https" if tls is not None else "http"
    log.info("listening on %s://%s:%d (data in %s)", scheme, _url_host(host), port, config.data_dir)
    if wire is None:
        log.info("tornado serves every request (server.fast_wire is off, or HTTPS)")
    _log_plugins(config)

    started = time.monotonic()
    # Replay builds millions of long-lived objects and frees almost none: the
    # cyclic collector would only rescan them, again and again (about half of
    # the load time). Afterwards they are frozen out of its sight for good.
    gc.disable()
    keep_large_blocks_mapped()
    opening = asyncio.ensure_future(journal.open(_log_progress))
    stop_waiter = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({opening, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done() and not journal.cancellable_open:
            await opening  # a replay thread cannot be stopped halfway: let it finish
        if not opening.done():  # stopped while still reaching NATS
            opening.cancel()
            log.info("stopped before the journal was open")
            stop_listening(server, wire)
            await journal.close()
            return EXIT_OK
        opening.result()
    except (JournalCorrupt, SnapshotCorrupt) as exc:
        log.error(
            "%s; start-up stopped so nothing is lost. See docs/journal-format.md, "
            "'Recovery', for what to do.", exc,
        )
        stop_listening(server, wire)
        journal.close_sync()
        return EXIT_FAILURE
    except StartupRefused as exc:
        log.error("%s; start-up stopped (see docs/nats.md)", exc)
        stop_listening(server, wire)
        await journal.close()
        return EXIT_FAILURE
    except OSError as exc:  # a journal file this user cannot read or write
        log.error("cannot open the journal in %s: %s", config.data_dir, _os_error(exc))
        stop_listening(server, wire)
        journal.close_sync()
        return EXIT_FAILURE
    finally:
        stop_waiter.cancel()
        gc.freeze()
        gc.enable()
    release_free_memory()  # before the index is built too: its build is start-up's peak
    mark_ready(ctx)
    release_free_memory()
    log.info(
        "ready: %d keys at revision %d, replay took %.2fs",
        len(store), journal.last_seq, time.monotonic() - started,
    )

    await stopping.wait()
    log.info(
        "stopping: draining %d in-flight requests",
        ctx.in_flight + (wire.receiving() if wire is not None else 0),
    )
    stop_listening(server, wire)
    ctx.end_streams()
    deadline = time.monotonic() + config.server.drain_seconds
    while (ctx.in_flight > 0 or wire is not None and wire.receiving()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    ctx.stop_periodic_tasks()
    plugins.hook.shutdown(ctx=ctx)
    if wire is not None:
        wire.close_all_connections()
    try:
        await asyncio.wait_for(server.close_all_connections(), timeout=5.0)
    except TimeoutError:
        log.warning("some connections did not close in time")
    await journal.close()
    log.info("stopped at revision %d", journal.last_seq)
    return EXIT_OK


def stop_listening(server: KvdHTTPServer, wire: Wire | None) -> None:
    """Stop accepting connections; open ones go on until closed."""
    server.stop()
    if wire is not None:
        wire.stop()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS once replay is done (glibc only).

    Replay's passing buffers and the sorted index's build leave about 20 MiB
    free but resident for 1M keys; glibc returns only the top of the heap by
    itself. Elsewhere (musl, macOS) there is nothing to call, and nothing lost.
    """
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, fixed


def keep_large_blocks_mapped() -> None:
    """Have glibc map every block of 128 KiB or more on its own, returned to the OS on free.

    By default glibc raises that threshold to the largest such block freed so
    far (up to 32 MiB), so after replay has freed a few buffers of some MiB,
    blocks that size come from the heap and stay resident when freed: about
    20 MiB at the end of a replay of 1M records from seals. glibc only.
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _glibc_function(name: str) -> Callable[..., int] | None:
    """The C library's function ``name``, or None where the process has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def _tls_context(certfile: str, keyfile: str) -> ssl.SSLContext | None:
    if not certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def _log_progress(done: int, total: int) -> None:
    if total:
        log.info("replaying journal: %.0f%% (%d of %d MiB)", 100 * done / total, done >> 20, total >> 20)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
