"""``kvd journal ...``: dump, verify, replay, history, stats, compact and repair on real data directories.

Stores are built in process exactly as ``kvd serve`` wires them (Store +
FileJournal + Compactor), with a fake clock so record times and expiries are
known; the commands run through ``kvd.cli.main`` (fast) and, for exit codes
and the live-server cases, as ``python -m kvd`` subprocesses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from tests_support import Ran

from kvd.audit import progress
from kvd.cli import main
from kvd.log.compaction import CompactionPolicy, Compactor
from kvd.log.file import FileJournal
from kvd.log.format import encode_record, format_ts, segment_name
from kvd.log.history import Layout
from kvd.log.lock import DataDirLock
from kvd.log.reader import JournalCorrupt, segment_first_seq
from kvd.log.snapshot import SnapshotHeader, read_snapshot, snapshot_seq, write_snapshot
from kvd.model import Change
from kvd.store import Store

REPO = Path(__file__).resolve().parent.parent
START = 1_700_000_000.0  # in the past, so keys that expire in the fake clock's future have expired now


# --- building stores -----------------------------------------------------------------


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Opened:
    store: Store
    journal: FileJournal
    compactor: Compactor


def open_store(data_dir: Path, clock: Clock, *, archive: bool = False) -> Opened:
    """A store wired as ``kvd serve`` wires it, replayed and ready."""
    store = Store(clock=clock)
    journal = FileJournal(
        data_dir, fsync="no", segment_bytes=4096, archive=archive,
        on_commit=store.apply, on_restore=store.restore, clock=clock,
    )
    store.attach(journal)
    journal.replay()
    store.finish_replay()
    return Opened(store, journal, Compactor(journal, store, CompactionPolicy()))


def encoded(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass
class Session:
    """What a scripted session wrote: after each seq, the model and the record's time."""

    states: list[dict[str, tuple[Any, float | None]]] = field(default_factory=lambda: [{}])
    times: list[float] = field(default_factory=lambda: [0.0])
    actors: dict[int, str | None] = field(default_factory=dict)

    @property
    def last(self) -> int:
        return len(self.states) - 1

    def live_at(self, seq: int) -> dict[str, Any]:
        """The model after ``seq``, without keys expired at that record's time."""
        moment = self.times[seq]
        return {
            key: value for key, (value, expires) in self.states[seq].items()
            if expires is None or expires > moment
        }


async def write(opened: Opened, clock: Clock, session: Session, change: Change) -> None:
    record = await opened.store.write(change)
    assert record.seq == session.last + 1
    state = dict(session.states[-1])
    if change.op == "put":
        for key, value in change.set.items():
            state[key] = (json.loads(value), change.expires.get(key))
    elif change.op == "clear":
        state.clear()
    else:
        for key in change.keys:
            state.pop(key, None)
    session.states.append(state)
    session.times.append(clock.now)
    session.actors[record.seq] = change.actor


async def random_session(
    opened: Opened, clock: Clock, session: Session, count: int, seed: int, start: int = 0
) -> None:
    """Puts (some expiring), deletes, sweeps of expired keys and the odd clear, one second apart."""
    rng = random.Random(seed)
    store = opened.store
    for i in range(start, start + count):
        clock.now += 1.0
        expired = store.take_expired(10)
        if expired:
            await write(opened, clock, session, Change(op="expire", keys=tuple(expired)))
            continue
        roll = rng.random()
        live = [f"k{n}" for n in range(8) if store.current(f"k{n}") is not None]
        actor = rng.choice([None, "alice", "bob"])
        if roll < 0.15 and live:
            change = Change(op="delete", keys=(rng.choice(live),), actor=actor)
        elif roll < 0.18:
            change = Change(op="clear", actor=actor)
        else:
            keys = rng.sample([f"k{n}" for n in range(8)], rng.choice([1, 1, 2]))
            values = {key: encoded({"i": i, "pad": "x" * rng.randrange(80)}) for key in keys}
            expires = {keys[0]: clock.now + rng.choice([0.5, 2.5, 6.5])} if rng.random() < 0.3 else {}
            change = Change(op="put", set=values, expires=expires, actor=actor)
        await write(opened, clock, session, change)


def build(data_dir: Path, *, archive: bool, compactions: int = 2, per_round: int = 60) -> Session:
    """A store with several segments and ``compactions`` snapshots, then more records after the last."""
    clock, session = Clock(), Session()

    async def run() -> None:
        opened = open_store(data_dir, clock, archive=archive)
        for round_ in range(compactions):
            await random_session(opened, clock, session, per_round, seed=round_, start=round_ * per_round)
            await opened.compactor.compact()
        await random_session(opened, clock, session, per_round, seed=99, start=1000)
        await opened.journal.close()

    asyncio.run(run())
    return session


@pytest.fixture(scope="module")
def archived(tmp_path_factory) -> tuple[Path, Session]:
    """Built once; tests that change files work on a copy (``copy_of``)."""
    data_dir = tmp_path_factory.mktemp("archived") / "data"
    return data_dir, build(data_dir, archive=True)


def copy_of(source: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "data"
    shutil.copytree(source, target)
    return target


def reopen_state(data_dir: Path) -> tuple[int, dict[str, Any]]:
    """Open the directory as start-up does; returns (last seq, key -> value)."""
    opened = open_store(data_dir, Clock(0.0))
    try:
        entries = opened.store.committed_entries()
        return opened.journal.last_seq, {key: json.loads(e.value) for key, e in entries.items()}
    finally:
        opened.journal.close_sync()


def files_of(data_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(data_dir)): path.read_bytes()
        for path in sorted(data_dir.rglob("*")) if path.is_file() and path.name != "LOCK"
    }


def edited(data: bytes) -> bytes:
    """Change one byte of the first record or entry in ``data`` (every one has a ts or a revision)."""
    changed = data.replace(b'"ts":"20', b'"ts":"21', 1)
    if changed == data:
        changed = data.replace(b'"r":', b'"r":1', 1)
    assert changed != data
    return changed


def edited_entry(snapshot: bytes) -> bytes:
    """A snapshot with one entry's revision changed."""
    changed = snapshot.replace(b'"r":', b'"r":1', 1)
    assert changed != snapshot
    return changed


def segment_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def seq_of(line: bytes) -> int:
    return json.loads(line)["seq"]


def rechain(lines: list[bytes], prev: str) -> list[bytes]:
    """Recompute every hash from ``prev`` on: what a forger who rewrites history would do."""
    out = []
    for line in lines:
        body = line[: line.rindex(b',"hash":"')]
        old_prev = json.loads(line)["prev"]
        body = body.replace(f'"prev":"{old_prev}"'.encode(), f'"prev":"{prev}"'.encode())
        prev = hashlib.sha256(body).hexdigest()
        out.append(body + b',"hash":"' + prev.encode() + b'"}\n')
    return out


# --- running the command -------------------------------------------------------------


@pytest.fixture
def kvd_journal(capsysbinary):  # noqa: ANN201
    """``kvd_journal(action, data_dir, *args)`` runs ``kvd journal`` in process."""

    def run(action: str, data_dir: Path, *args: str) -> Ran:
        code = main(["journal", action, "--data-dir", str(data_dir), *args])
        out, err = capsysbinary.readouterr()
        return Ran(code, out, err.decode())

    return run


def run_kvd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvd", *args], capture_output=True, text=True, timeout=120,
        cwd=cwd or REPO,
    )


# --- dump ----------------------------------------------------------------------------


def test_dump_prints_every_retained_record_byte_for_byte_archive_first(archived, kvd_journal):
    data_dir, session = archived
    layout = Layout.scan(data_dir)
    assert layout.archived_segments and layout.segments  # history spans archive and live
    stored = b"".join(path.read_bytes() for path in layout.all_segments)
    ran = kvd_journal("dump", data_dir)
    assert ran.code == 0 and ran.err == ""
    assert ran.out == stored
    assert [record["seq"] for record in ran.lines()] == list(range(1, session.last + 1))
    for line in ran.out.splitlines(keepends=True):  # an auditor can recompute each hash
        cut = line.rindex(b',"hash":"')
        assert hashlib.sha256(line[:cut]).hexdigest() == json.loads(line)["hash"]


def test_dump_filters_by_key_pattern_op_and_inclusive_seq_range(archived, kvd_journal):
    data_dir, session = archived
    every = kvd_journal("dump", data_dir).lines()

    def touches(record: dict[str, Any], match) -> bool:  # noqa: ANN001
        if record["op"] == "clear":
            return True
        return any(match(key) for key in record.get("set", {}) or record.get("keys", []))

    by_key = kvd_journal("dump", data_dir, "--key", "k[13]*").lines()
    assert by_key == [r for r in every if r["op"] == "clear"]  # '[' is literal: no key matches
    by_key = kvd_journal("dump", data_dir, "--key", "k?").lines()
    assert by_key == every  # every key is k0..k7
    by_key = kvd_journal("dump", data_dir, "--key", "k3").lines()
    assert by_key == [r for r in every if touches(r, lambda key: key == "k3")]
    assert any(r["op"] == "put" for r in by_key) and any(r["op"] == "clear" for r in by_key)

    ops = kvd_journal("dump", data_dir, "--op", "delete", "--op", "clear").lines()
    assert ops == [r for r in every if r["op"] in ("delete", "clear")] and ops

    ranged = kvd_journal("dump", data_dir, "--since-seq", "55", "--until-seq", "65").lines()
    assert [r["seq"] for r in ranged] == list(range(55, 66))  # across the first compaction (seq 60)
    combined = kvd_journal("dump", data_dir, "--key", "k3", "--until-seq", "40").lines()
    assert combined == [r for r in by_key if r["seq"] <= 40]


def test_dump_time_bounds_are_inclusive_iso_8601(archived, kvd_journal):
    data_dir, session = archived
    since, until = format_ts(session.times[10]), format_ts(session.times[20])
    ran = kvd_journal("dump", data_dir, "--since", since, "--until", until)
    assert [r["seq"] for r in ran.lines()] == list(range(10, 21))
    # The same instant written with another offset selects the same records.
    plus_two = datetime.fromtimestamp(session.times[10], timezone(timedelta(hours=2))).isoformat()
    assert kvd_journal("dump", data_dir, "--since", plus_two, "--until", until).out == ran.out
    assert kvd_journal("dump", data_dir, "--since", "2099-01-01").out == b""


def test_dump_notes_when_older_records_are_not_retained(tmp_path, kvd_journal):
    data_dir = tmp_path / "data"
    session = build(data_dir, archive=False, compactions=1)
    ran = kvd_journal("dump", data_dir)
    assert ran.code == 0
    first = Layout.scan(data_dir).segments[0]
    assert [r["seq"] for r in ran.lines()] == list(range(segment_first_seq(first), session.last + 1))
    assert f"records before seq {segment_first_seq(first)} are no longer retained" in ran.err


# --- verify --------------------------------------------------------------------------


def test_verify_passes_a_clean_store_and_prints_the_head_to_record(archived, kvd_journal):
    data_dir, session = archived
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 0, ran.text
    last = json.loads(Layout.scan(data_dir).segments[-1].read_bytes().splitlines()[-1])
    assert f"records:   1..{session.last} ({session.last})" in ran.text
    assert f"anchor:    {session.last}:{last['hash']}" in ran.text
    # Both snapshots were compared with the replayed records, entry by entry.
    snapshots = [snapshot_seq(path) for path in Layout.scan(data_dir).all_snapshots]
    assert len(snapshots) == 2
    for seq in snapshots:
        assert f"seq {seq}: entries equal the replayed records" in ran.text
    again = kvd_journal("verify", data_dir, "--expect-head", f"{session.last}:{last['hash']}")
    assert again.code == 0 and "still has the recorded hash" in again.text


def pick_segment(data_dir: Path, where: str) -> tuple[Path, Path]:
    """A segment with at least four records, in the archive or the live directory, and the next one."""
    layout = Layout.scan(data_dir)
    every = layout.all_segments
    candidates = layout.archived_segments if where == "archive" else layout.segments
    segment = next(path for path in candidates if len(segment_lines(path)) >= 4 and path != every[-1])
    return segment, every[every.index(segment) + 1]


@pytest.mark.parametrize("where", ["archive", "live"])
@pytest.mark.parametrize("tamper", ["edit", "insert", "remove", "reorder", "rehash"])
def test_verify_detects_each_kind_of_tampering_naming_the_record(
        archived, tmp_path, kvd_journal, tamper, where):
    data_dir = copy_of(archived[0], tmp_path)
    segment, following = pick_segment(data_dir, where)
    lines = segment_lines(segment)
    target = seq_of(lines[1])
    named = segment
    if tamper == "edit":
        lines[1] = edited(lines[1])
        bad = target
    elif tamper == "insert":
        lines.insert(2, lines[1])  # a copy of record N where N+1 belongs
        bad = target + 1
    elif tamper == "remove":
        del lines[1]
        bad = target
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
        bad = target
    else:
        # Edit, then recompute every hash to the end of the segment: only the
        # link into the next segment can tell.
        lines[1:] = rechain([edited(lines[1])] + lines[2:], json.loads(lines[0])["hash"])
        named, bad = following, segment_first_seq(following)
    segment.write_bytes(b"".join(lines))
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 1
    first = ran.text.splitlines()[0]
    assert first.startswith("DAMAGED: ") and str(named) in first and f"(seq {bad})" in first
    if tamper == "rehash":
        assert first.endswith("hash chain broken")
    assert "ok:" not in ran.text


def test_verify_detects_a_removed_archive_segment(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    archive = Layout.scan(data_dir).archived_segments
    removed = archive[1]
    first, following = segment_first_seq(removed), segment_first_seq(archive[2])
    removed.unlink()
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 1
    assert f"(seq {first}): records {first}..{following - 1} are missing" in ran.text


@pytest.mark.parametrize("removed", [1, 2])
def test_verify_detects_the_oldest_archived_segments_removed(archived, tmp_path, kvd_journal, removed):
    """Nothing is left before them to break a link, so the chain alone passed: the history
    must still start at seq 1 or right after a retained snapshot."""
    intact, session = archived
    anchor = kvd_journal("verify", intact).text.split("anchor:    ")[1].split()[0]
    data_dir = copy_of(intact, tmp_path)
    archive = Layout.scan(data_dir).archived_segments
    for path in archive[:removed]:
        path.unlink()
    oldest = archive[removed]
    first = segment_first_seq(oldest)
    assert first - 1 < min(snapshot_seq(path) for path in Layout.scan(data_dir).all_snapshots)
    missing = (f"DAMAGED: {oldest} at byte 0 (seq 1): records 1..{first - 1} are missing: the oldest "
               f"retained segment starts at seq {first}, and no retained snapshot ends at seq {first - 1}")
    for args in ([], ["--expect-head", anchor]):
        ran = kvd_journal("verify", data_dir, *args)
        assert ran.code == 1, ran.text
        assert ran.text.splitlines()[0] == missing
        assert f"records {first}..{session.last} check out" in ran.text  # the rest is still checked
        assert "ok:" not in ran.text
    assert reopen_state(data_dir)[0] == session.last  # start-up reads no archive: it opens


def test_stats_history_and_dump_report_records_missing_from_the_start(archived, tmp_path, kvd_journal):
    """They print what is retained, then name the gap and exit 1, instead of starting the
    history later as if a compaction without archive had dropped the first records."""
    data_dir = copy_of(archived[0], tmp_path)
    archive = Layout.scan(data_dir).archived_segments
    archive[0].unlink()
    first = segment_first_seq(archive[1])
    error = (f"kvd: error: journal damaged in {archive[1]} at byte 0 (seq 1): records 1..{first - 1} "
             "are missing")
    stats = kvd_journal("stats", data_dir, "--json")
    assert stats.code == 1 and stats.err.startswith(error)
    figures = json.loads(stats.out)
    assert figures["first"]["seq"] == first and figures["damage"].startswith(error[len("kvd: error: "):])
    assert figures["live_keys"] is not None  # the state at the head is still known
    history = kvd_journal("history", data_dir, "k1")
    assert history.code == 1 and history.err.startswith(error)
    assert "no longer retained" not in history.err  # it was not compacted away
    assert history.lines() == [
        line for line in kvd_journal("history", archived[0], "k1").lines() if line["seq"] >= first
    ]
    dump = kvd_journal("dump", data_dir)
    assert dump.code == 1 and dump.err.startswith(error)
    assert [record["seq"] for record in dump.lines()] == list(range(first, archived[1].last + 1))
    later = kvd_journal("dump", data_dir, "--since-seq", str(first))  # asks for nothing missing
    assert later.code == 0 and later.err == "" and later.out == dump.out


def turn_archive_on_after_a_compaction(data_dir: Path) -> None:
    """A store compacted without archive, then with it: the old snapshot opens the archive."""
    session = build(data_dir, archive=False, compactions=1)
    clock = Clock(session.times[-1])

    async def run() -> None:
        opened = open_store(data_dir, clock, archive=True)
        await random_session(opened, clock, session, 40, seed=7, start=2000)
        await opened.compactor.compact()
        await opened.journal.close()

    asyncio.run(run())
    layout = Layout.scan(data_dir)
    assert layout.archived_snapshots and layout.archived_segments
    assert segment_first_seq(layout.archived_segments[0]) == snapshot_seq(layout.archived_snapshots[0]) + 1


def leave_a_covered_live_segment(data_dir: Path) -> None:
    """Compacted without archive, one segment the snapshot covers not yet retired (a crash
    in the middle of the retirement, or a change-feed reader still sending it)."""
    layout = Layout.scan(data_dir)
    base = snapshot_seq(layout.snapshots[-1])
    covered = [path for path in layout.archived_segments if segment_first_seq(path) <= base]
    covered[-1].rename(data_dir / covered[-1].name)
    shutil.rmtree(data_dir / "archive")
    oldest = Layout.scan(data_dir).segments[0]
    assert oldest.name == covered[-1].name and segment_first_seq(oldest) - 1 != base


@pytest.mark.parametrize("layout", [
    "empty directory", "fresh store", "compacted without archive", "a covered live segment",
    "archive turned on after a compaction", "crashed before retiring, archive on",
])
def test_verify_passes_every_layout_compaction_leaves_and_start_up_opens_them(
        archived, tmp_path, kvd_journal, layout):
    data_dir = tmp_path / "data"
    if layout == "empty directory":
        data_dir.mkdir()
    elif layout == "fresh store":
        open_store(data_dir, Clock()).journal.close_sync()
        assert [path.name for path in Layout.scan(data_dir).segments] == [segment_name(1)]
    elif layout == "archive turned on after a compaction":
        turn_archive_on_after_a_compaction(data_dir)
    else:
        data_dir = copy_of(archived[0], tmp_path)
        if layout == "compacted without archive":
            shutil.rmtree(data_dir / "archive")
        elif layout == "a covered live segment":
            leave_a_covered_live_segment(data_dir)
        else:
            crashed_before_retiring(data_dir)
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 0, ran.text
    if layout == "a covered live segment":
        assert "not linked back, but the snapshot at seq" in ran.text
    for action, *args in (("stats",), ("history", "k1"), ("dump",)):
        assert kvd_journal(action, data_dir, *args).code == 0, action
    reopen_state(data_dir)  # and start-up opens it


@pytest.mark.parametrize("snapshot", [False, True])
def test_verify_and_start_up_both_refuse_live_segments_starting_too_late(
        archived, tmp_path, kvd_journal, snapshot):
    """No archive: the live segments start after seq 1 with no snapshot, or after the
    snapshot's seq + 1. Start-up stops at their first record; verify names the gap."""
    data_dir = copy_of(archived[0], tmp_path)
    shutil.rmtree(data_dir / "archive")
    layout = Layout.scan(data_dir)
    if snapshot:
        base = snapshot_seq(layout.snapshots[-1])
        layout.segments[0].unlink()
        oldest = layout.segments[1]
    else:
        base = 0
        layout.snapshots[-1].unlink()
        oldest = layout.segments[0]
    first = segment_first_seq(oldest)
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 1
    assert ran.text.startswith(f"DAMAGED: {oldest} at byte 0 (seq {base + 1}): records {base + 1}..{first - 1} "
                               "are missing")
    with pytest.raises(JournalCorrupt, match=rf"\(seq {base + 1}\): sequence {first}, expected {base + 1}$"):
        reopen_state(data_dir)


@pytest.mark.parametrize("moves", [1, 1000])
def test_verify_starts_over_when_files_move_and_never_calls_that_damage(
    archived, tmp_path, kvd_journal, monkeypatch, moves
):
    """A compaction moves files under a verify of a live directory. Exit 1 means damage
    to the scripts that run verify; a view that never held still is exit 3, not 1."""
    from kvd.audit import verify as verify_module

    data_dir = copy_of(archived[0], tmp_path)
    real_scan = verify_module.Layout.scan
    moved: list[tuple[Path, Path]] = []

    def scan_while_compacting(directory: Path) -> Layout:
        for away, back in moved:  # the file of the try before is back in place
            away.rename(back)
        moved.clear()
        layout = real_scan(directory)
        if len(scans) < moves:  # then it moves, after the listing and before the reading
            segment = layout.segments[0]
            away = segment.with_name(segment.name + ".moving")
            segment.rename(away)
            moved.append((away, segment))
        scans.append(directory)
        return layout

    scans: list[Path] = []
    monkeypatch.setattr(verify_module.Layout, "scan", staticmethod(scan_while_compacting))
    monkeypatch.setattr(verify_module, "MOVED_BACKOFF_S", 0.0)
    ran = kvd_journal("verify", data_dir)
    monkeypatch.undo()
    for away, back in moved:
        away.rename(back)
    if moves == 1:
        assert ran.code == 0 and len(scans) == 2, ran.text
    else:
        assert ran.code == 3 and len(scans) == verify_module.MOVED_RETRIES
        assert "nothing was found damaged" in ran.err
    assert kvd_journal("verify", data_dir).code == 0


def doc_script(title: str) -> str:
    """The first Python block after ``title`` in docs/journal-format.md."""
    text = (REPO / "docs" / "journal-format.md").read_text()
    after = text[text.index(title):]
    return after[after.index("```python\n") + len("```python\n"):].split("```", 1)[0]


def test_the_documented_chain_check_passes_an_archived_compacted_store_and_finds_damage(
    archived, tmp_path
):
    """An auditor's own script, from the format document alone (without kvd's code)."""
    script = doc_script("Checking a whole store")
    data_dir = copy_of(archived[0], tmp_path)
    ran = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(f"ok: records up to seq {archived[1].last}, "), ran.stdout
    shutil.rmtree(data_dir / "archive")  # compacted, nothing archived: starts after the snapshot
    ran = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    last = Layout.scan(data_dir).segments[-1]
    lines = last.read_bytes().splitlines(keepends=True)
    last.write_bytes(b"".join(lines[:-2] + lines[-1:]))  # a record removed
    ran = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode != 0 and "AssertionError" in ran.stderr


def test_verify_treats_a_torn_last_record_as_a_warning(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    last = Layout.scan(data_dir).segments[-1]
    with open(last, "ab") as file:
        file.write(b'{"v":1,"seq":99999,"ts":"2026-')  # a write in progress
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 0, ran.text
    assert ran.text.startswith("warning: torn last record: 30 bytes")


def test_verify_calls_an_unterminated_record_before_the_last_segment_damage(
        archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    segment = Layout.scan(data_dir).archived_segments[0]
    data = segment.read_bytes()
    segment.write_bytes(data[:-5])
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 1 and "unterminated record in a segment that is not the last" in ran.text


def rewrite_snapshot(path: Path, change) -> None:  # noqa: ANN001
    """Rewrite a snapshot with a valid digest: a forger who knows the format."""
    header, items = read_snapshot(path)
    entries = dict(items)
    header, entries = change(header, entries)
    path.unlink()
    write_snapshot(path.parent, header, sorted(entries.items()))


def test_verify_detects_an_edited_snapshot_by_its_digest(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    snapshot = Layout.scan(data_dir).snapshots[0]
    snapshot.write_bytes(edited_entry(snapshot.read_bytes()))
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 1
    assert f"DAMAGED: {snapshot} (seq {snapshot_seq(snapshot)}): snapshot damaged: checksum mismatch" in ran.text


def test_verify_detects_a_forged_snapshot_by_replaying_the_archive(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    snapshot = Layout.scan(data_dir).archived_snapshots[0]

    def forge(header, entries):  # noqa: ANN001, ANN202
        key = sorted(entries)[0]
        entries[key].value = b'"forged"'
        return header, entries

    rewrite_snapshot(snapshot, forge)
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 1
    assert "snapshot differs from the replayed records: key 'k" in ran.text and "different value" in ran.text
    assert "s3cr3t" not in ran.text  # values are never printed


def test_verify_detects_a_snapshot_head_that_is_not_its_record(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    snapshot = Layout.scan(data_dir).snapshots[0]
    rewrite_snapshot(snapshot, lambda header, entries: (
        SnapshotHeader(header.seq, header.ts, "1" * 64, header.keys), entries))
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 1 and f"is not the hash of record {snapshot_seq(snapshot)}" in ran.text


def test_verify_without_archive_checks_the_live_records_link_to_the_snapshot(tmp_path, kvd_journal):
    data_dir = tmp_path / "data"
    build(data_dir, archive=False, compactions=1)
    assert kvd_journal("verify", data_dir).code == 0
    snapshot = Layout.scan(data_dir).snapshots[0]
    rewrite_snapshot(snapshot, lambda header, entries: (
        SnapshotHeader(header.seq, header.ts, "1" * 64, header.keys), entries))
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 1
    assert f"(seq {snapshot_seq(snapshot) + 1}): hash chain broken" in ran.text


def test_expect_head_catches_records_cut_off_the_end_and_rewritten_history(tmp_path, kvd_journal):
    data_dir = tmp_path / "data"
    build(data_dir, archive=False, compactions=0, per_round=40)
    segments = Layout.scan(data_dir).segments
    anchor = kvd_journal("verify", data_dir).text.split("anchor:    ")[1].split()[0]
    head_seq = int(anchor.split(":")[0])

    cut = copy_of(data_dir, tmp_path / "cut")
    last = cut / segments[-1].name
    lines = segment_lines(last)
    removed = min(3, len(lines))
    last.write_bytes(b"".join(lines[: len(lines) - removed]))  # whole records off the end
    assert kvd_journal("verify", cut).code == 0  # the chain alone cannot tell...
    ran = kvd_journal("verify", cut, "--expect-head", anchor)
    assert ran.code == 1  # ...the recorded head can
    assert f"(seq {head_seq}): the journal ends at seq {head_seq - removed}" in ran.text

    forged = copy_of(data_dir, tmp_path / "forged")
    first = forged / segments[0].name
    lines = segment_lines(first)
    lines[1] = edited(lines[1])
    first.write_bytes(b"".join(lines[:1] + rechain(lines[1:], json.loads(lines[0])["hash"])))
    for later in segments[1:]:  # the forger rehashes every record after the edit
        prev = json.loads((forged / segments[segments.index(later) - 1].name).read_bytes().splitlines()[-1])["hash"]
        (forged / later.name).write_bytes(b"".join(rechain(segment_lines(forged / later.name), prev)))
    assert kvd_journal("verify", forged).code == 0
    ran = kvd_journal("verify", forged, "--expect-head", anchor)
    assert ran.code == 1 and "differs from the recorded head" in ran.text and "rewritten" in ran.text


def test_verify_prints_progress_only_to_a_terminal(archived, kvd_journal, monkeypatch):
    data_dir, _ = archived
    assert kvd_journal("verify", data_dir).err == ""  # not a terminal: no meter
    monkeypatch.setattr(progress, "PROGRESS_DELAY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "PROGRESS_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    ran = kvd_journal("verify", data_dir)
    assert ran.code == 0 and "\rverify: " in ran.err and "%" in ran.err
    assert "verify:" not in ran.text  # stdout stays clean


# --- replay --------------------------------------------------------------------------


def test_replay_seq_equals_the_model_after_every_record(archived, kvd_journal):
    data_dir, session = archived
    for seq in range(session.last + 1):
        ran = kvd_journal("replay", data_dir, "--seq", str(seq))
        assert ran.code == 0
        assert ran.out.endswith(b"\n") and ran.out.count(b"\n") == 1  # one JSON object
        state = json.loads(ran.out)
        assert state == session.live_at(seq), f"seq {seq}"
        assert list(state) == sorted(state)
        assert f"state after seq {seq}" in ran.err


def test_replay_at_a_time_is_the_state_then_without_keys_expired_by_then(archived, kvd_journal):
    data_dir, session = archived
    excluded = 0
    # Records are one second apart and expiries fall on half seconds, so +0.5 s
    # lands exactly on some expiry times: a key expires at that instant.
    for seq in range(1, session.last + 1, 2):
        for offset in (0.0, 0.5):
            moment = session.times[seq] + offset
            ran = kvd_journal("replay", data_dir, "--at", format_ts(moment))
            assert ran.code == 0 and f"state after seq {seq} " in ran.err
            state = session.states[seq]
            expected = {k: v for k, (v, x) in state.items() if x is None or x > moment}
            excluded += len(state) - len(expected)
            assert json.loads(ran.out) == expected, f"seq {seq} + {offset}"
    assert excluded > 5  # expired but not yet swept keys were left out


def test_replay_before_the_retained_history_exits_1(tmp_path, kvd_journal):
    data_dir = tmp_path / "data"
    session = build(data_dir, archive=False, compactions=1)
    oldest = snapshot_seq(Layout.scan(data_dir).snapshots[0])
    ran = kvd_journal("replay", data_dir, "--seq", str(oldest - 1))
    assert ran.code == 1 and ran.out == b""
    assert f"older than the retained history (seq {oldest})" in ran.err
    assert kvd_journal("replay", data_dir, "--at", format_ts(session.times[1])).code == 1
    ok = kvd_journal("replay", data_dir, "--seq", str(oldest))
    assert ok.code == 0 and json.loads(ok.out) == session.live_at(oldest)
    beyond = kvd_journal("replay", data_dir, "--seq", str(session.last + 1))
    assert beyond.code == 1 and f"after the last record (seq {session.last})" in beyond.err


# --- history -------------------------------------------------------------------------


def test_history_lists_every_change_of_one_key_with_its_actor(tmp_path, kvd_journal):
    data_dir, clock, session = tmp_path / "data", Clock(), Session()

    async def run() -> None:
        opened = open_store(data_dir, clock)
        steps = [
            Change(op="put", set={"a": b'{"v":1}', "a*": b"0"}, actor="alice"),
            Change(op="put", set={"b": b"1"}, actor="bob"),
            Change(op="put", set={"a": b'{"v":2}'}, expires={"a": START + 3.5}),
            Change(op="expire", keys=("a",)),
            Change(op="clear", actor="carol"),  # "a" is gone already: not a change of it
            Change(op="put", set={"a": b"3"}, actor="bob"),
            Change(op="delete", keys=("a",), actor="alice"),
            Change(op="put", set={"a": b"4"}),
            Change(op="clear", actor="carol"),
        ]
        for step in steps:
            clock.now += 1.0
            await write(opened, clock, session, step)
        await opened.journal.close()

    asyncio.run(run())
    ran = kvd_journal("history", data_dir, "a")
    assert ran.code == 0
    ts = [format_ts(moment) for moment in session.times]
    assert ran.lines() == [
        {"seq": 1, "ts": ts[1], "op": "put", "actor": "alice", "value": {"v": 1}},
        {"seq": 3, "ts": ts[3], "op": "put", "value": {"v": 2}, "expires": format_ts(START + 3.5)},
        {"seq": 4, "ts": ts[4], "op": "expire"},
        {"seq": 6, "ts": ts[6], "op": "put", "actor": "bob", "value": 3},
        {"seq": 7, "ts": ts[7], "op": "delete", "actor": "alice"},
        {"seq": 8, "ts": ts[8], "op": "put", "value": 4},
        {"seq": 9, "ts": ts[9], "op": "clear", "actor": "carol"},
    ]
    literal = kvd_journal("history", data_dir, "a*")  # KEY is literal, not a pattern
    assert [line["seq"] for line in literal.lines()] == [1, 5]
    never = kvd_journal("history", data_dir, "never-written")
    assert never.code == 0 and never.out == b"" and never.err == ""


def test_history_after_compaction_without_archive_says_what_is_gone(tmp_path, kvd_journal):
    data_dir = tmp_path / "data"
    session = build(data_dir, archive=False, compactions=1)
    oldest = snapshot_seq(Layout.scan(data_dir).snapshots[0])
    key = next(iter(session.states[oldest]))
    ran = kvd_journal("history", data_dir, key)
    assert ran.code == 0
    assert all(line["seq"] > oldest for line in ran.lines())
    assert f"records before seq {oldest + 1} are no longer retained" in ran.err
    assert f"at seq {oldest} the key held a value" in ran.err


def test_dump_and_history_print_what_they_read_before_damage_then_exit_1(
        archived, tmp_path, kvd_journal):
    """The exit status auditing.md promises: the output up to the damage, then an error and 1,
    also for a key with no change before it."""
    intact = archived[0]
    data_dir = copy_of(intact, tmp_path)
    segment = Layout.scan(data_dir).archived_segments[1]
    lines = segment_lines(segment)
    bad = seq_of(lines[1])
    lines[1] = edited(lines[1])
    segment.write_bytes(b"".join(lines))
    error = f"kvd: error: journal damaged in {segment} at byte {len(lines[0])} (seq {bad}): checksum mismatch"

    dump = kvd_journal("dump", data_dir)
    assert dump.code == 1 and dump.err.startswith(error)
    assert [record["seq"] for record in dump.lines()] == list(range(1, bad))

    changes = kvd_journal("history", intact, "k1").lines()
    before = [change for change in changes if change["seq"] < bad]
    assert before and len(before) < len(changes)  # changes on both sides of the damage
    history = kvd_journal("history", data_dir, "k1")
    assert history.code == 1 and history.err.startswith(error)
    assert history.lines() == before
    never = kvd_journal("history", data_dir, "never-written")
    assert never.code == 1 and never.out == b"" and never.err.startswith(error)
    assert kvd_journal("history", intact, "never-written").code == 0  # only the damage makes it 1


# --- stats ---------------------------------------------------------------------------


def test_stats_counts_records_files_keys_and_names_the_head(archived, kvd_journal):
    data_dir, session = archived
    ran = kvd_journal("stats", data_dir, "--json")
    assert ran.code == 0
    stats = json.loads(ran.out)
    layout = Layout.scan(data_dir)
    dumped = kvd_journal("dump", data_dir).lines()
    assert stats["records"] == session.last
    assert stats["head"] == {"seq": session.last, "hash": dumped[-1]["hash"], "ts": dumped[-1]["ts"]}
    assert stats["ops"] == {op: sum(1 for r in dumped if r["op"] == op) for op in sorted({r["op"] for r in dumped})}
    final = session.states[-1]
    # The clock started in the past, so every key with an expiry has expired by now.
    assert stats["live_keys"] == sum(1 for _, x in final.values() if x is None)
    assert stats["expired_keys"] == sum(1 for _, x in final.values() if x is not None)
    assert stats["segments"]["count"] == len(layout.segments)
    assert stats["archive"]["segments"]["count"] == len(layout.archived_segments)
    assert stats["snapshots"]["seqs"] == [snapshot_seq(p) for p in layout.snapshots]
    assert stats["oldest_point"] == {"seq": 0, "ts": None}
    assert stats["bytes"] == sum(p.stat().st_size for p in layout.all_segments + layout.all_snapshots)
    text = kvd_journal("stats", data_dir)
    assert text.code == 0
    assert f"head           seq {session.last}, hash {dumped[-1]['hash']}" in text.text
    assert f"records        {session.last} (seq 1..{session.last}" in text.text


# --- compact -------------------------------------------------------------------------


def test_compact_snapshots_a_stopped_store_and_archives_per_config(tmp_path, kvd_journal):
    data_dir = tmp_path / "data"
    session = build(data_dir, archive=False, compactions=0, per_round=120)
    config = tmp_path / "kvd.toml"
    config.write_text("[journal]\narchive = true\n")
    before = files_of(data_dir)
    ran = kvd_journal("compact", data_dir, "--config", str(config))
    assert ran.code == 0, ran.err
    assert "compacted: snapshot of" in ran.text and f"at seq {session.last}" in ran.text
    layout = Layout.scan(data_dir)
    assert [snapshot_seq(p) for p in layout.snapshots] == [session.last]
    assert {p.name for p in layout.archived_segments} | {p.name for p in layout.segments} == set(before) | {
        segment_name(session.last + 1)}
    for path in layout.archived_segments:  # moved, not rewritten
        assert path.read_bytes() == before[path.name]
    assert kvd_journal("verify", data_dir).code == 0
    last, state = reopen_state(data_dir)
    assert last == session.last
    assert state == {k: v for k, (v, _) in session.states[-1].items()}
    again = kvd_journal("compact", data_dir, "--config", str(config))
    assert again.code == 0 and again.text.startswith("nothing to compact")


def test_compact_and_repair_refuse_while_the_directory_is_locked(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    before = files_of(data_dir)
    lock = DataDirLock(data_dir)
    lock.acquire()  # what a running server holds
    try:
        for action in ("compact", "repair"):
            ran = kvd_journal(action, data_dir)
            assert ran.code == 1 and "in use by another kvd" in ran.err and "stop the server" in ran.err
        assert kvd_journal("verify", data_dir).code == 0  # reading needs no lock
    finally:
        lock.release()
    assert files_of(data_dir) == before


# --- repair --------------------------------------------------------------------------


def quarantined(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((data_dir / "quarantine").iterdir())}


def test_repair_cuts_from_the_damaged_record_to_the_end_into_quarantine(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    session = archived[1]
    live = Layout.scan(data_dir).segments
    assert len(live) >= 2
    damaged = live[0]
    lines = segment_lines(damaged)
    bad_seq = seq_of(lines[2])
    offset = len(lines[0]) + len(lines[1])
    lines[2] = edited(lines[2])
    damaged.write_bytes(b"".join(lines))
    tail = b"".join(lines[2:])
    later = {path.name: path.read_bytes() for path in live[1:]}
    assert kvd_journal("verify", data_dir).code == 1

    dry = kvd_journal("repair", data_dir, "--dry-run")
    assert dry.code == 0 and f"would cut {damaged} from byte {offset} (seq {bad_seq}.." in dry.text
    assert f"after repair: {data_dir} would verify; head seq {bad_seq - 1}" in dry.text
    assert not (data_dir / "quarantine").exists()

    ran = kvd_journal("repair", data_dir)
    assert ran.code == 0, ran.text + ran.err
    assert f"cut {damaged} from byte {offset} (seq {bad_seq}..{seq_of(lines[-1])}, {len(tail)} bytes)" in ran.text
    assert f"after repair: {data_dir} verifies; head seq {bad_seq - 1}" in ran.text
    cut = quarantined(data_dir)
    manifest = json.loads(next(v for k, v in cut.items() if k.endswith("-repair.json")))
    assert [c["offset"] for c in manifest["cuts"]] == [offset] + [0] * len(later)
    by_source = {c["source"]: cut[c["quarantined_as"]] for c in manifest["cuts"]}
    assert by_source == {damaged.name: tail, **later}  # every cut byte kept, nothing lost
    assert any(name.endswith(f"-{damaged.name}-from-byte-{offset}") for name in cut)
    assert damaged.read_bytes() == b"".join(lines[:2])
    last, state = reopen_state(data_dir)  # the store opens with every record before the damage
    assert last == bad_seq - 1
    assert state == {k: v for k, (v, _) in session.states[bad_seq - 1].items()}
    assert kvd_journal("verify", data_dir).code == 0


def test_repair_dry_run_changes_nothing(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    segment = Layout.scan(data_dir).segments[-1]
    segment.write_bytes(edited(segment.read_bytes()))
    before = files_of(data_dir)
    ran = kvd_journal("repair", data_dir, "--dry-run")
    assert ran.code == 0 and "would cut" in ran.text
    assert files_of(data_dir) == before


def test_repair_keeps_a_torn_tail_in_quarantine(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    last = Layout.scan(data_dir).segments[-1]
    intact = last.read_bytes()
    last.write_bytes(intact + b'{"v":1,"seq":')
    ran = kvd_journal("repair", data_dir)
    assert ran.code == 0 and "torn last record" in ran.text
    assert last.read_bytes() == intact
    assert [v for k, v in quarantined(data_dir).items() if not k.endswith(".json")] == [b'{"v":1,"seq":']


def test_repair_replaces_a_damaged_newest_snapshot_from_the_archive(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    session = archived[1]
    snapshot = Layout.scan(data_dir).snapshots[0]
    damaged = edited_entry(snapshot.read_bytes())
    snapshot.write_bytes(damaged)
    dry = kvd_journal("repair", data_dir, "--dry-run")  # checks the store with the archive's files back
    assert dry.code == 0 and f"after repair: {data_dir} would verify; head seq {session.last}," in dry.text
    ran = kvd_journal("repair", data_dir)
    assert ran.code == 0, ran.text + ran.err
    assert "restored" in ran.text and "snapshot damaged" in ran.text
    assert damaged in quarantined(data_dir).values()
    assert not snapshot.exists()
    last, state = reopen_state(data_dir)  # nothing lost: the archive rebuilt the state
    assert last == session.last
    assert state == {k: v for k, (v, _) in session.states[-1].items()}
    assert kvd_journal("verify", data_dir).code == 0


def test_repair_refuses_a_damaged_snapshot_it_cannot_replace(tmp_path, kvd_journal):
    data_dir = tmp_path / "data"
    build(data_dir, archive=False, compactions=1)
    snapshot = Layout.scan(data_dir).snapshots[0]
    snapshot.write_bytes(edited_entry(snapshot.read_bytes()))
    before = files_of(data_dir)
    ran = kvd_journal("repair", data_dir)
    assert ran.code == 1
    assert "would lose everything after it" in ran.err and "Nothing was changed" in ran.err
    assert files_of(data_dir) == before and not (data_dir / "quarantine").exists()


def with_forged_head(snapshot: bytes, head: str) -> bytes:
    """The snapshot with another ``head`` in its header and its digest made to match."""
    lines = snapshot.splitlines(keepends=True)
    header = json.loads(lines[0])
    header["head"] = head
    before = json.dumps(header, separators=(",", ":")).encode() + b"\n" + b"".join(lines[1:-1])
    trailer = json.loads(lines[-1])
    trailer["sha256"] = hashlib.sha256(before).hexdigest()
    return before + json.dumps(trailer, separators=(",", ":")).encode() + b"\n"


def test_repair_blames_a_snapshot_whose_head_the_archive_contradicts_not_the_records(
    archived, tmp_path, kvd_journal
):
    """Record N+1 links to record N's hash as the archive has it, not to the newest
    snapshot's head: the snapshot's header is what changed. Cutting the records after it
    (as for other damage) would have put acknowledged writes in quarantine."""
    data_dir = copy_of(archived[0], tmp_path)
    session = archived[1]
    snapshot = Layout.scan(data_dir).snapshots[0]
    forged = with_forged_head(snapshot.read_bytes(), "1" * 64)
    snapshot.write_bytes(forged)
    segments_before = {p.name: p.read_bytes() for p in Layout.scan(data_dir).segments}
    with pytest.raises(JournalCorrupt, match=f"its prev is not the head of {snapshot.name}"):
        reopen_state(data_dir)  # start-up names both suspects
    ran = kvd_journal("repair", data_dir)
    assert ran.code == 0, ran.text + ran.err
    assert "its head is not the hash of record" in ran.text
    cut = [content for name, content in quarantined(data_dir).items() if not name.endswith(".json")]
    assert cut == [forged]  # the snapshot alone
    assert {p.name: p.read_bytes() for p in Layout.scan(data_dir).segments
            if p.name in segments_before} == segments_before  # no record cut
    last, state = reopen_state(data_dir)
    assert last == session.last
    assert state == {k: v for k, (v, _) in session.states[-1].items()}
    assert kvd_journal("verify", data_dir).code == 0


def test_repair_refuses_to_guess_between_a_snapshot_head_and_the_records_without_archive(
    tmp_path, kvd_journal
):
    data_dir = tmp_path / "data"
    build(data_dir, archive=False, compactions=1)
    snapshot = Layout.scan(data_dir).snapshots[0]
    snapshot.write_bytes(with_forged_head(snapshot.read_bytes(), "1" * 64))
    before = files_of(data_dir)
    ran = kvd_journal("repair", data_dir)
    assert ran.code == 1
    assert "no archived history tells which" in ran.err and "Nothing was changed" in ran.err
    assert files_of(data_dir) == before and not (data_dir / "quarantine").exists()


def test_repair_leaves_damaged_archived_history_alone(archived, tmp_path, kvd_journal):
    data_dir = copy_of(archived[0], tmp_path)
    segment = Layout.scan(data_dir).archived_segments[0]
    segment.write_bytes(edited(segment.read_bytes()))
    before = files_of(data_dir)
    dry = kvd_journal("repair", data_dir, "--dry-run")
    ran = kvd_journal("repair", data_dir)
    assert ran.code == 1
    assert "nothing to repair" in ran.text and "archived history is left as evidence" in ran.text
    assert files_of(data_dir) == before
    assert reopen_state(data_dir)[0] == archived[1].last  # the store opens all the same
    assert dry.code == 1 and damage_lines(dry) == damage_lines(ran)  # predicted


def damage_lines(ran: Ran) -> list[str]:
    """What ``repair`` says ``verify`` finds after it (the same for a dry run and a real one)."""
    return [line for line in ran.text.splitlines() if line.lstrip().startswith(("DAMAGED:", "verify failed:"))]


def test_repair_dry_run_exits_1_for_a_gap_repair_cannot_mend(archived, tmp_path, kvd_journal):
    """The oldest archived segment deleted: start-up reads no archive, so there is nothing to
    cut, but verify fails; the dry run says so and exits 1, as the repair itself does."""
    data_dir = copy_of(archived[0], tmp_path)
    archive = Layout.scan(data_dir).archived_segments
    archive[0].unlink()
    first = segment_first_seq(archive[1])
    before = files_of(data_dir)
    dry = kvd_journal("repair", data_dir, "--dry-run")
    assert dry.code == 1, dry.text + dry.err
    assert "nothing to repair" in dry.text
    assert "after repair the store would open, but verify would still find damage" in dry.text
    assert f"DAMAGED: {archive[1]} at byte 0 (seq 1): records 1..{first - 1} are missing" in dry.text
    assert files_of(data_dir) == before
    assert not list(tmp_path.glob("**/quarantine"))
    ran = kvd_journal("repair", data_dir)
    assert ran.code == 1 and damage_lines(ran) == damage_lines(dry)
    assert files_of(data_dir) == before  # nothing it could cut


def crashed_before_retiring(data_dir: Path) -> tuple[int, list[Path]]:
    """A copy of ``archived`` as a crash between the newest snapshot's rename and its
    retirement leaves it: the segments it covers and the older snapshot still live.
    Returns the newest snapshot's seq and the segments it covers."""
    layout = Layout.scan(data_dir)
    (older,) = layout.archived_snapshots
    older.rename(data_dir / older.name)
    covered = [
        path.rename(data_dir / path.name) for path in layout.archived_segments
        if segment_first_seq(path) > snapshot_seq(older)
    ]
    assert len(covered) >= 2
    return snapshot_seq(layout.snapshots[-1]), covered


@pytest.mark.parametrize("where", ["inside", "at-the-end"])
def test_repair_moves_damaged_segments_the_snapshot_covers_and_nothing_after_it(
    archived, tmp_path, kvd_journal, where
):
    """Start-up checks them before retiring them; repair moves them all whole into
    quarantine (the snapshot holds their effect), so every record after it stays."""
    from kvd.log.reader import JournalCorrupt

    data_dir = copy_of(archived[0], tmp_path)
    session = archived[1]
    seq, covered = crashed_before_retiring(data_dir)
    damaged = covered[0] if where == "inside" else covered[-1]
    lines = segment_lines(damaged)
    del lines[1 if where == "inside" else -1]
    damaged.write_bytes(b"".join(lines))
    kept = {path.name: path.read_bytes() for path in covered}
    later = {path.name: path.read_bytes() for path in Layout.scan(data_dir).segments if path not in covered}
    with pytest.raises(JournalCorrupt):
        reopen_state(data_dir)
    before = files_of(data_dir)

    # The gap appears only once the segments are cut: the dry run checks the store as the
    # repair would leave it, so it predicts it (and changes nothing).
    dry = kvd_journal("repair", data_dir, "--dry-run")
    assert files_of(data_dir) == before and not (data_dir / "quarantine").exists()
    ran = kvd_journal("repair", data_dir)
    assert dry.code == ran.code == 1
    assert "are missing" in "".join(damage_lines(ran))
    assert damage_lines(dry) == damage_lines(ran)
    assert f"covered by the snapshot at seq {seq}; damaged at seq" in ran.text, ran.text + ran.err
    cut = quarantined(data_dir)
    manifest = json.loads(next(v for k, v in cut.items() if k.endswith("-repair.json")))
    assert {c["source"]: cut[c["quarantined_as"]] for c in manifest["cuts"]} == kept
    assert {path.name: path.read_bytes() for path in Layout.scan(data_dir).segments} == later
    last, state = reopen_state(data_dir)  # nothing after the snapshot was cut
    assert last == session.last
    assert state == {k: v for k, (v, _) in session.states[-1].items()}
    # The archive now ends where the quarantined segments began: verify names the gap.
    assert ran.code == 1 and "after repair the store opens" in ran.text


# --- command line, end to end --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["dump", "--since", "yesterday"], "not an ISO 8601 time"),
    (["dump", "--since", "2026-01-01", "--since-seq", "3"], "not allowed with"),
    (["dump", "--key", "a\\"], "lone"),
    (["replay"], "one of the arguments --at --seq is required"),
    (["replay", "--seq", "-1"], "not a sequence number"),
    (["verify", "--expect-head", "12"], "SEQ:HASH"),
    (["history"], "KEY"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_with_a_message(tmp_path, args, message):
    result = run_kvd("journal", *args, "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr and result.stdout == ""


def test_bad_key_pattern_is_reported_in_cli_words_not_http_ones(tmp_path, capsys):
    """The filter language raises an HTTP 400 for clients; a command line has no status code."""
    with pytest.raises(SystemExit) as exited:
        main(["journal", "dump", "--data-dir", str(tmp_path), "--key", "a\\"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "argument --key: bad filter pattern: it ends with a lone" in err
    assert "400" not in err and "bad_request" not in err


@pytest.mark.slow
def test_cli_exit_codes_and_output(archived, tmp_path):
    data_dir = copy_of(archived[0], tmp_path)
    ok = run_kvd("journal", "verify", "--data-dir", str(data_dir))
    assert ok.returncode == 0 and "ok:" in ok.stdout
    dump = run_kvd("journal", "dump", "--data-dir", str(data_dir), "--until-seq", "3")
    assert [json.loads(line)["seq"] for line in dump.stdout.splitlines()] == [1, 2, 3]
    missing = run_kvd("journal", "stats", "--data-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no data directory" in missing.stderr
    config = run_kvd("journal", "stats", "--config", str(tmp_path / "nope.toml"))
    assert config.returncode == 2 and "nope.toml" in config.stderr
    segment = Layout.scan(data_dir).segments[0]
    segment.write_bytes(edited(segment.read_bytes()))
    bad = run_kvd("journal", "verify", "--data-dir", str(data_dir))
    assert bad.returncode == 1 and bad.stdout.startswith(f"DAMAGED: {segment}")


@pytest.mark.slow
def test_read_commands_work_on_a_running_server_and_writers_refuse(kvd_process, tmp_path):
    server = kvd_process(args=["--fsync", "always"], env={"KVD_JOURNAL_ARCHIVE": "true",
                                                          "KVD_JOURNAL_SEGMENT_BYTES": "4096"})
    for i in range(60):
        assert server.request("PUT", f"/keys/k{i % 7}", {"i": i, "pad": "x" * 100}).status in (200, 201)
    assert server.request("POST", "/journal/compact").status == 200
    for i in range(10):
        server.request("PUT", f"/keys/after{i}", i)
    data = str(server.data_dir)
    verify = run_kvd("journal", "verify", "--data-dir", data)
    assert verify.returncode == 0 and "ok:" in verify.stdout, verify.stdout
    dump = run_kvd("journal", "dump", "--data-dir", data, "--key", "after*")
    assert [json.loads(line)["set"] for line in dump.stdout.splitlines()] == [{f"after{i}": i} for i in range(10)]
    replay = run_kvd("journal", "replay", "--data-dir", data, "--seq", "7")
    assert json.loads(replay.stdout) == {f"k{i}": {"i": i, "pad": "x" * 100} for i in range(7)}
    stats = json.loads(run_kvd("journal", "stats", "--data-dir", data, "--json").stdout)
    assert stats["head"]["seq"] == 70 and stats["live_keys"] == 17
    for action in ("compact", "repair"):
        refused = run_kvd("journal", action, "--data-dir", data)
        assert refused.returncode == 1 and "in use by another kvd" in refused.stderr
    assert server.get_key("after9").status == 200  # the server never noticed
    assert server.request("PUT", "/keys/still", 1).status == 201


@pytest.mark.slow
def test_repair_lets_a_server_that_refused_damage_start_again(kvd_process, tmp_path):
    server = kvd_process()
    for i in range(20):
        server.request("PUT", f"/keys/k{i}", i)
    server.kill()
    segment = tmp_path / "data" / segment_name(1)
    lines = segment_lines(segment)
    lines[10] = lines[10].replace(b'"k10":10', b'"k10":99')
    segment.write_bytes(b"".join(lines))
    with pytest.raises(RuntimeError, match="seq 11"):
        kvd_process()
    repair = run_kvd("journal", "repair", "--data-dir", str(tmp_path / "data"))
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "seq 11..20" in repair.stdout
    restarted = kvd_process()
    assert restarted.get_key("k9").json() == {"k9": 9}
    assert restarted.get_key("k10").status == 404  # cut with everything after it
    assert restarted.request("PUT", "/keys/new", 1).status == 201
    cut = b"".join(
        path.read_bytes() for path in sorted((tmp_path / "data" / "quarantine").iterdir())
        if not path.name.endswith(".json")
    )
    assert cut == b"".join(lines[10:])


@pytest.mark.slow
def test_a_server_refuses_damage_the_snapshot_covers_until_repaired(archived, kvd_process, tmp_path):
    """Not archived unseen at start-up: the error names the file and seq; after repair it starts."""
    data_dir = copy_of(archived[0], tmp_path)
    _, covered = crashed_before_retiring(data_dir)
    lines = segment_lines(covered[0])
    missing = seq_of(lines[1])
    covered[0].write_bytes(b"".join(lines[:1] + lines[2:]))
    env = {"KVD_JOURNAL_ARCHIVE": "true", "KVD_JOURNAL_COMPACT_CHECK_SECONDS": "3600"}
    with pytest.raises(RuntimeError, match=f"{covered[0].name} at byte .* [(]seq {missing}[)]"):
        kvd_process(data_dir, env=env)
    assert covered[0].exists() and not (data_dir / "archive" / covered[0].name).exists()
    repair = run_kvd("journal", "repair", "--data-dir", str(data_dir))
    assert "covered by the snapshot" in repair.stdout, repair.stdout + repair.stderr
    restarted = kvd_process(data_dir, env=env)
    assert f"at revision {archived[1].last}" in restarted.log()


# --- the helpers and modules under the commands ------------------------------------


def test_encode_record_is_what_the_tests_forge_with():
    # rechain() edits bytes directly; it must agree with the writer's own encoding.
    line, digest = encode_record(seq=1, ts="2026-11-27T00:00:00.000000Z", op="put",
                                 prev="0" * 64, set_values={"a": b"1"})
    assert rechain([line], "0" * 64) == [line]


def test_history_records_stay_chained_when_compaction_moves_a_segment_mid_read(archived, tmp_path):
    """A reader that lists again after a segment moved must still link to the last record it read."""
    from kvd.log.history import History
    from kvd.log.reader import JournalCorrupt

    data_dir = copy_of(archived[0], tmp_path)
    first, second = Layout.scan(data_dir).segments[:2]
    records = History(data_dir).records(segment_first_seq(first) - 1)
    next(records)  # reading the first live segment
    # Compaction "archives" the next segment meanwhile, and it is a forgery chained elsewhere.
    forged = rechain(segment_lines(second), "1" * 64)
    (data_dir / "archive" / second.name).write_bytes(b"".join(forged))
    second.unlink()
    with pytest.raises(JournalCorrupt, match="hash chain broken") as caught:
        list(records)
    assert caught.value.seq == segment_first_seq(second)
