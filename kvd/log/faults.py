"""Named crash points, so tests can kill the process at each step of compaction.

Armed only by the environment variable ``KVD_TEST_CRASH_AT`` (reserved for
tests; see ``kvd.config``): when it names a step, the process SIGKILLs
itself on reaching it, exactly as a power cut or an OOM kill would stop it,
with no cleanup. Unarmed, a crash point is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "KVD_TEST_CRASH_AT"

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
