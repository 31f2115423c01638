"""Accepting connections, with a pause instead of a spin when descriptors run out.

``tornado.netutil.add_accept_handler`` lets EMFILE and ENFILE escape from ``accept()``:
the connection stays in the listen queue, the listening socket stays readable, and the
loop calls the handler again at once. At a limit of 64 open files that was 100% CPU and
a traceback per try (11-19 MB of log in 5 s). Here such an error stops watching the
socket for a pause (0.1 s, doubling up to 1 s, back to 0.1 s once an accept succeeds),
as Go's net/http and nginx do; the waiting connections stay queued in the kernel until a
descriptor frees up. Each episode logs one warning naming the limit (at most one a
minute per socket) and, when accepting works again, how long it lasted.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from tornado.ioloop import IOLoop

log = logging.getLogger("kvd.app")

FIRST_PAUSE, LONGEST_PAUSE = 0.1, 1.0  # seconds the socket is left alone after EMFILE
WARN_EVERY = 60.0  # seconds between warnings of new episodes on one socket
ACCEPTS_PER_WAKE = 128  # as tornado: a bound, so one busy socket does not starve the loop
# Out of descriptors (the process's or the system's), or of kernel memory for one.
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def add_accept_handler(
    sock: socket.socket, callback: Callable[[socket.socket, Any], None]
) -> Callable[[], None]:
    """Call ``callback(connection, address)`` for each connection accepted on ``sock``,
    pausing while the process is out of descriptors; returns what stops it (tornado's
    ``add_accept_handler`` contract)."""
    return _Acceptor(sock, callback).stop


class _Acceptor:
    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None]) -> None:
        self.sock = sock
        self.callback = callback
        self.loop = IOLoop.current()
        self.stopped = False
        self.retry: object | None = None  # the timeout handle while paused
        self.pause = 0.0  # 0 outside an episode
        self.episode_started = 0.0
        self.warned = False  # this episode's warning was logged
        self.last_warning = -WARN_EVERY
        self.loop.add_handler(sock, self.accept, IOLoop.READ)

    def accept(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            if self.stopped:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue  # gone while still queued
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    raise
                self.back_off(exc)
                return
            if self.pause:
                self.episode_over()
            self.callback(connection, address)

    def back_off(self, exc: OSError) -> None:
        self.loop.remove_handler(self.sock)
        now = time.monotonic()
        if not self.pause:
            self.pause, self.episode_started = FIRST_PAUSE, now
            self.warned = now - self.last_warning >= WARN_EVERY
            if self.warned:
                self.last_warning = now
                log.warning("%s: not accepting connections for %.1f s, then retrying at most every"
                            " %.0f s until a descriptor is free", _describe(exc), self.pause, LONGEST_PAUSE)
        else:
            self.pause = min(self.pause * 2, LONGEST_PAUSE)
        self.retry = self.loop.call_later(self.pause, self.resume)

    def resume(self) -> None:
        self.retry = None
        if not self.stopped:
            self.loop.add_handler(self.sock, self.accept, IOLoop.READ)

    def episode_over(self) -> None:
        if self.warned:
            log.info("accepting connections again after %.1f s", time.monotonic() - self.episode_started)
        self.pause, self.warned = 0.0, False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.retry is not None:
            self.loop.remove_timeout(self.retry)
            self.retry = None
        else:
            self.loop.remove_handler(self.sock)


def _describe(exc: OSError) -> str:
    if exc.errno == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return f"too many open files (limit {soft})"
    if exc.errno == errno.ENFILE:
        return "too many open files in the system (fs.file-max)"
    return f"out of memory for a connection ({exc.strerror})"
