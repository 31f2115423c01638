"""Start-up on two cores: a helper process checks the journal's later part
while the reader replays the first.

Replay is CPU-bound: a regular expression splits each block into columns and
every record's SHA-256 is recomputed (``simple_puts.py``), about 3 µs a
record, against 1 µs to apply it. Only the link from a run to the record
before it needs what came earlier, so a helper process can split and check
the later chunks of the journal (``check_run``) while the reader works
through the first part; the reader then links each run it gets back
(``SimplePuts.follows``) and decodes whatever the helper left (any other
record, damage, a torn tail) in full, from the file, exactly as when it
reads alone. The helper changes how fast replay is, never what it accepts.

It runs only where it pays: at least two CPUs this process may use (a server
pinned to one core, or held under two CPUs by a cgroup quota, replays alone)
and enough bytes to outweigh starting a Python process (about 0.15 s). It is a new interpreter, not a fork, since
replay runs beside the event loop's thread.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvd.log.lines import line_blocks, line_start
from kvd.log.simple_puts import Run, SimplePuts, check_run, split_block

log = logging.getLogger(__name__)

# The helper takes the later 60 % of the bytes: the reader also applies every
# record (the helper's too), so it keeps the smaller part. Balanced by
# bench/replay.py on the machine docs/benchmarks.md describes.
HELPER_SHARE = 0.6
MIN_HELPER_BYTES = 32 * 1024 * 1024  # below this a process costs more than it saves
CHUNK_BYTES = 4 * 1024 * 1024  # one result file: the reader holds one at a time (16 MiB: +10 MiB RSS)
_READ_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Chunk:
    """The lines of ``path`` that begin at a byte in ``start .. stop - 1``."""

    path: Path
    start: int
    stop: int


@dataclass(slots=True)
class ChunkScan:
    """A chunk's lines in order: checked runs, and byte counts the reader must decode itself."""

    begin: int  # where the chunk's first line begins
    pieces: list[SimplePuts | int]


def scan_chunk(chunk: Chunk) -> ChunkScan:
    """Split and check one chunk's lines (in the helper): what the reader, alone,
    would do with them before it links each run to the record before."""
    pieces: list[SimplePuts | int] = []

    def leave(size: int) -> None:
        if pieces and isinstance(pieces[-1], int):
            pieces[-1] += size
        else:
            pieces.append(size)

    with open(chunk.path, "rb") as file:
        begin, end = line_start(file, chunk.start), line_start(file, chunk.stop)
        for data in line_blocks(file, begin, end, _READ_BYTES):
            if not data.endswith(b"\n"):
                leave(len(data))  # an unterminated last line: the reader decides what it is
                continue
            for piece in split_block(data):
                puts = check_run(piece) if isinstance(piece, Run) else None
                if puts is not None:
                    pieces.append(puts)
                else:
                    leave(piece.size if isinstance(piece, Run) else len(piece))
    return ChunkScan(begin, pieces)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD", or "max PERIOD"


def usable_cpus() -> float:
    """CPUs this process may use: its affinity (taskset, cpuset), capped by a cgroup
    CPU quota (``docker run --cpus``, compose ``cpus:``), which affinity does not show."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    return cpus


def plan_chunks(segments: list[Path]) -> list[Chunk]:
    """The helper's chunks, in journal order: none when it would not pay."""
    sizes = [path.stat().st_size for path in segments]
    total = sum(sizes)
    helper_from = int(total * (1 - HELPER_SHARE))
    if usable_cpus() < 2 or total - helper_from < MIN_HELPER_BYTES:
        return []
    chunks = []
    segment_start = 0
    for path, size in zip(segments, sizes, strict=True):
        start = max(helper_from - segment_start, 0)
        while start < size:
            stop = min(start + CHUNK_BYTES, size)
            chunks.append(Chunk(path, start, stop))
            start = stop
        segment_start += size
    return chunks


RESULTS_PREFIX = "kvd-replay-"  # then the server's pid: kvd-replay-PID-XXXXXXXX


def _remove_stale_results() -> None:
    """Results directories of servers no longer running (killed while their helper
    was done but before they removed its directory)."""
    for path in Path(tempfile.gettempdir()).glob(f"{RESULTS_PREFIX}*-*"):
        owner = path.name[len(RESULTS_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not _running(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def helper_command(module: str, function: str, *args: str) -> list[str]:
    """The command line of a new interpreter that calls ``module.function(*args)``.

    Where ``kvd`` imports from is appended to its sys.path (last: a PYTHONPATH
    entry would come before the standard library, where another site-packages
    module could shadow it). A new interpreter, not a fork: replay runs
    beside the event loop's thread. The replay helper and the sealer use it.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.append(sys.argv[1]); from {module} import {function}; {function}(*sys.argv[2:])"
    return [sys.executable, "-c", code, package_root, *args]


class ScanAhead:
    """The helper process and its chunk scans, handed to the reader in journal order.

    The helper is a new interpreter running ``_helper_main(RESULTS_DIR)`` with
    the chunks on its stdin; it pickles each chunk's scan to a file there and
    names it on stdout. Files, not a pipe, carry the scans: the reader's thread holds the
    GIL while it works, and a large message read 64 KiB at a time by any
    thread of this process would stall for up to 5 ms a read (the switch
    interval). A plain process, not a multiprocessing pool, so nothing (no
    pool thread, no resource tracker) outlives replay.
    """

    def __init__(self, chunks: list[Chunk]) -> None:
        self._pending = deque(enumerate(chunks))
        self._results: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        plan = "".join(
            json.dumps([chunk.start, chunk.stop, os.fsdecode(chunk.path)]) + "\n" for chunk in chunks
        )
        try:
            _remove_stale_results()
            self._results = Path(tempfile.mkdtemp(prefix=f"{RESULTS_PREFIX}{os.getpid()}-"))
            self._process = subprocess.Popen(
                helper_command(__name__, "_helper_main", str(self._results)),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            assert self._process.stdin is not None
            self._process.stdin.write(plan.encode())
            self._process.stdin.close()
        except OSError as exc:  # no temp directory, no process: slower, not wrong
            log.warning("replay helper could not start: %r; replaying alone", exc)
            self._stop()

    def first_start(self, path: Path) -> int | None:
        """Where in ``path`` the helper's chunks start (a byte hint), if they do."""
        return next((chunk.start for _, chunk in self._pending if chunk.path == path), None)

    def scans(self, path: Path) -> Iterator[tuple[Chunk, ChunkScan | None]]:
        """The chunks of ``path`` with their scans, in order, each let go once taken; None
        where the helper failed (the reader then reads the chunk alone)."""
        while self._pending and self._pending[0][1].path == path:
            number, chunk = self._pending.popleft()
            yield chunk, self._take(number, chunk)

    def drop(self, path: Path) -> None:
        """Forget the chunks of ``path`` not taken (the reader stopped early in it).

        The helper would report them first, so it is stopped: any later chunk
        is then the reader's to read alone.
        """
        dropped = False
        while self._pending and self._pending[0][1].path == path:
            self._pending.popleft()
            dropped = True
        if dropped:
            self._stop()

    def _take(self, number: int, chunk: Chunk) -> ChunkScan | None:
        if self._process is None:
            return None
        try:
            assert self._process.stdout is not None
            done = self._process.stdout.readline()
            if done != b"%d\n" % number:
                raise RuntimeError(f"helper exited ({self._process.wait()})")
            assert self._results is not None
            result = self._results / f"{number}.pickle"
            scan = pickle.loads(result.read_bytes())
            result.unlink()
            return scan
        except Exception as exc:  # a helper that died or sent nonsense: slower, not wrong
            log.warning("replay helper failed on %s from byte %d: %r; reading the rest alone",
                        chunk.path, chunk.start, exc)
            self._stop()
            return None

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()  # ours, by its handle; it may have finished already
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None

    def close(self) -> None:
        self._pending.clear()
        self._stop()
        if self._results is not None:
            shutil.rmtree(self._results, ignore_errors=True)


def _helper_main(results: str) -> None:
    """The helper process: scan each chunk of the plan on stdin, in order.

    When the server is gone (killed mid-replay), the next report finds its
    pipe closed: the helper then removes the results it left and stops.
    """
    gc.disable()  # it builds many objects and keeps none between chunks
    directory = Path(results)
    try:
        for number, line in enumerate(sys.stdin):
            start, stop, path = json.loads(line)
            scan = scan_chunk(Chunk(Path(path), start, stop))
            with open(directory / f"{number}.pickle", "wb") as out:
                pickle.dump(scan, out, protocol=pickle.HIGHEST_PROTOCOL)
            sys.stdout.write(f"{number}\n")
            sys.stdout.flush()
    except BrokenPipeError:
        shutil.rmtree(directory, ignore_errors=True)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit


