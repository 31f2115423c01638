"""Named crash points, so tests can kill the process at each step of compaction.

Armed only by environment variables reserved for tests (see ``kvd.config``):

- ``KVD_TEST_CRASH_AT``: when it names a step, the process SIGKILLs itself
  on reaching it, exactly as a power cut or an OOM kill would stop it, with
  no cleanup;
- ``KVD_TEST_PAUSE_WRITER_AT``: when it names a step the forked snapshot
  writer reaches, the writer SIGSTOPs itself there (the server goes on), so
  that a test can find it among the server's children and kill it, as the
  OOM killer would, or let it go on (SIGCONT).

Unarmed, a crash point is a dictionary lookup (two in the writer).
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "KVD_TEST_CRASH_AT"
PAUSE_WRITER_ENV = "KVD_TEST_PAUSE_WRITER_AT"

# The steps of a compaction, in order; docs/journal-format.md describes each.
COMPACTION_STEPS = (
    "segment-rolled",  # the next record goes to a new segment; snapshot not written yet
    "snapshot-written",  # temp file written and fsynced, not yet renamed
    "snapshot-renamed",  # snapshot in place, directory not yet fsynced
    "segment-retired",  # the first old segment deleted or archived, others not yet
    "snapshot-retired",  # the previous snapshot deleted or archived
    "compaction-done",  # every step done, before the server notes it
)


_also_kill: int | None = None  # the server, in a forked snapshot writer


def crash_with(pid: int) -> None:
    """In a forked child: a crash point kills ``pid`` (the server) too, as one crash would."""
    global _also_kill
    _also_kill = pid


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        if _also_kill is not None:
            os.kill(_also_kill, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if _also_kill is not None and os.environ.get(PAUSE_WRITER_ENV) == step:
        # Only in the forked writer (which alone has _also_kill set): the server never stops here.
        os.kill(os.getpid(), signal.SIGSTOP)
