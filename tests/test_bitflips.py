"""Bit flips in every journal file: start-up refuses or ``verify`` reports, never a different value.

One store is built in process (several segments, two compactions, archive
on), then for a deterministic sample of byte offsets across every segment
and snapshot, live and archived, one bit is flipped in a fresh copy of the
pristine directory. Each copy is checked twice:

* ``kvd journal verify`` (run first: start-up may cut a torn tail) must exit
  1 and name the damaged file (and the seq, for a segment);
* start-up (``FileJournal.replay`` as ``kvd serve`` wires it, reading the
  finished live segments from their seals) must either
  raise ``JournalCorrupt``/``SnapshotCorrupt`` naming the file (and the seq
  the damaged record should have had), or load exactly the pristine state:
  every key with its value, revision and expiry, and the same head.

A flip that start-up accepts with a different state is a silent change and
fails the test. Flips in seals (kvd/log/seal.py, caches that verify does not
read) must change nothing: start-up ignores the seal and reads its segment
or snapshot. The final newline of the last record (a flip there once
passed for a torn tail) is always in the sample, and has a test of its own
for all eight bits. A few damaged copies of each kind of file are then
repaired with ``kvd journal repair``: the store opens with every record
before the damage, and what was cut is in ``quarantine/``, byte for byte.

``KVD_TEST_BITFLIPS`` (default 320) sets how many flips, ``KVD_TEST_BITFLIPS_SEED``
the seed and ``KVD_TEST_BITFLIPS_REPAIRS`` (default 24) how many repairs, for
long runs; the counts are printed (``pytest -s``) and asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import build_harness

from kvd import jsonio
from kvd.cli import main
from kvd.config import load_config
from kvd.log import scan_ahead
from kvd.log.history import ARCHIVE_DIR, QUARANTINE_DIR, Layout
from kvd.log.reader import JournalCorrupt
from kvd.log.seal import SEAL_SUFFIX, seal_path, write_seal, write_snapshot_seal
from kvd.log.snapshot import SnapshotCorrupt
from kvd.model import Change, Entry
from kvd.server import build_context

FLIPS = int(os.environ.get("KVD_TEST_BITFLIPS", "320"))
SEED = int(os.environ.get("KVD_TEST_BITFLIPS_SEED", "20261127"))
REPAIRS = int(os.environ.get("KVD_TEST_BITFLIPS_REPAIRS", "24"))
# Seals are written once, by the test (no sealer process at each start-up).
SETTINGS = {"journal.segment_bytes": 4096, "journal.archive": True, "journal.seal_segments": False}
PAST = 1_700_000_000.0  # expiry times already passed: such keys are swept by an expire record
FUTURE = 4_100_000_000.0  # expiry times that never pass during the test


# --- the pristine store ----------------------------------------------------------------


@dataclass
class Pristine:
    """The store every flip starts from, and what it held after each seq."""

    data_dir: Path
    states: list[dict[str, Entry]]  # index = seq: the committed entries after that record
    head: str  # the hash of the last record
    seq_at: dict[str, list[tuple[int, int]]]  # segment (relative path) -> (end offset, seq) per line

    @property
    def last_seq(self) -> int:
        return len(self.states) - 1

    def files(self) -> list[str]:
        """Every segment, snapshot and seal, live and archived, relative to the data directory."""
        layout = Layout.scan(self.data_dir)
        paths = layout.all_segments + layout.all_snapshots + sorted(self.data_dir.glob("*" + SEAL_SUFFIX))
        return sorted(str(path.relative_to(self.data_dir)) for path in paths)

    def seq_of(self, name: str, offset: int) -> int | None:
        """The seq of the record whose line holds byte ``offset`` of segment ``name``."""
        for end, seq in self.seq_at.get(name, ()):
            if offset < end:
                return seq
        return None


def _value(rng: random.Random, i: int) -> bytes:
    """Compact JSON of many shapes: escapes, multi-byte UTF-8, big integers, nesting, null."""
    choices = [
        {"i": i, "pad": "x" * rng.randrange(60)},
        f"caf\u00e9 \u65e5\u672c {i} \U0001f600 \"quoted\" \\ tab\t",
        [i, -i, 1.5e300, None, True, False, 2**70 + i],
        None,
        {"nested": {"deeper": [{"i": i}, "\u00ff" * rng.randrange(8)]}},
        i * 7919,
    ]
    return jsonio.dumps(rng.choice(choices))  # as the handlers encode a value


async def _write_round(store, rng: random.Random, states: list[dict[str, Entry]], count: int, start: int) -> None:  # noqa: ANN001
    keys = [f"k{n}" for n in range(10)] + ["user/42", "with space", "\u00fcber", "\u2603/snow"]
    for i in range(start, start + count):
        live = [key for key in keys if store.current(key) is not None]
        roll = rng.random()
        expired = store.take_expired(3) if 0.12 <= roll < 0.2 else []
        if roll < 0.12 and live:
            change = Change(op="delete", keys=(rng.choice(live),), actor=rng.choice([None, "alice"]))
        elif expired:
            change = Change(op="expire", keys=tuple(expired))  # as the expiry plugin's sweep writes it
        elif 0.2 <= roll < 0.22:
            change = Change(op="clear", actor="bob")
        else:
            chosen = rng.sample(keys, rng.choice([1, 1, 2, 3]))
            expires = {chosen[0]: rng.choice([PAST, FUTURE])} if rng.random() < 0.3 else {}
            change = Change(
                op="put", set={key: _value(rng, i) for key in chosen}, expires=expires,
                actor=rng.choice([None, "alice", "bob"]),
            )
        record = await store.write(change)
        assert record.seq == len(states)
        states.append(dict(store.committed_entries()))  # entries are replaced, never changed


def build_pristine(data_dir: Path) -> Pristine:
    """Three rounds of writes with a compaction after the first two: archive, snapshot, segments."""
    rng = random.Random(SEED)
    states: list[dict[str, Entry]] = [{}]

    async def run() -> str:
        harness = build_harness(data_dir, **SETTINGS)
        harness.ctx.stop_periodic_tasks()  # no sweep or compaction of its own: the test drives them
        for round_ in range(3):
            await _write_round(harness.store, rng, states, 60, round_ * 60)
            if round_ < 2:
                await harness.ctx.compactor.compact()
        head = harness.journal.head_hash
        await harness.journal.close()
        return head

    head = asyncio.run(run())
    layout = Layout.scan(data_dir)
    for segment in layout.segments[:-1]:
        write_seal(segment)  # as the server's sealer does once a segment is finished
    for snapshot in layout.snapshots:
        write_snapshot_seal(snapshot)  # ... and once a compaction has written a snapshot
    seq_at: dict[str, list[tuple[int, int]]] = {}
    for path in Layout.scan(data_dir).all_segments:
        end, lines = 0, []
        for line in path.read_bytes().splitlines(keepends=True):
            end += len(line)
            lines.append((end, json.loads(line)["seq"]))
        seq_at[str(path.relative_to(data_dir))] = lines
    return Pristine(data_dir, states, head, seq_at)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    built = build_pristine(tmp_path_factory.mktemp("pristine") / "data")
    layout = Layout.scan(built.data_dir)
    # What the sample must cover: live segments, the live snapshot, archived segments and snapshots.
    assert len(layout.segments) >= 2 and len(layout.snapshots) == 1
    assert len(layout.archived_segments) >= 4 and len(layout.archived_snapshots) == 1
    assert all(path.stat().st_size > 0 for path in layout.segments)  # the last one too
    assert all(seal_path(path).exists() for path in layout.segments[:-1] + layout.snapshots)
    return built


# --- opening and checking a copy ------------------------------------------------------


@dataclass
class Loaded:
    entries: dict[str, Entry]
    last_seq: int
    head: str


def start_up(data_dir: Path) -> Loaded:
    """Replay ``data_dir`` as ``kvd serve`` does; raises what start-up would stop on."""
    settings = {"journal.data_dir": str(data_dir), **SETTINGS}
    ctx = build_context(load_config(None, environ={}, overrides=settings))
    journal = ctx.journal
    try:
        journal.replay()  # type: ignore[union-attr]
        return Loaded(dict(ctx.store.committed_entries()), journal.last_seq, journal.head_hash)  # type: ignore[union-attr]
    finally:
        journal.close_sync()  # type: ignore[union-attr]


def kvd_journal(*args: str) -> tuple[int, str]:
    """``kvd journal ARGS`` in process; returns the exit status and stdout + stderr."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["journal", *args])
    return code, out.getvalue()


def flip(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def fresh_copy(pristine: Pristine, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(pristine.data_dir, target)
    return target


def last_newline(pristine: Pristine) -> tuple[str, int]:
    """The final newline of the last record of the last live segment."""
    last = Layout.scan(pristine.data_dir).segments[-1]
    return str(last.relative_to(pristine.data_dir)), last.stat().st_size - 1


def sample_flips(pristine: Pristine, count: int) -> list[tuple[str, int, int]]:
    """(file, offset, bit): each file's first and last byte and a share of its own, the rest uniform.

    The share (at least ten offsets a file) keeps the small snapshots from
    being drowned out by the segments; a small ``count`` can be exceeded so.
    The last byte of the last live segment is the final newline of the last
    record, the one byte where damage could pass for a torn tail.
    """
    rng = random.Random(SEED)
    sizes = {name: (pristine.data_dir / name).stat().st_size for name in pristine.files()}
    chosen: dict[tuple[str, int], int] = {}

    def take(name: str, offset: int) -> None:
        if (name, offset) not in chosen:
            chosen[(name, offset)] = rng.randrange(8)

    share = max(10, count // (4 * len(sizes)))
    for name, size in sizes.items():
        for offset in (0, size - 1, *rng.sample(range(size), min(size, share))):
            take(name, offset)
    everything = [(name, offset) for name, size in sizes.items() for offset in range(size)]
    while len(chosen) < count:
        take(*rng.choice(everything))
    flips = [(name, offset, bit) for (name, offset), bit in chosen.items()]
    rng.shuffle(flips)  # repairs are tried on the first few of each kind
    return flips


def file_kind(name: str) -> str:
    if name.endswith(SEAL_SUFFIX):
        return "live seal"
    archived = name.startswith(ARCHIVE_DIR + "/")
    snapshot = Path(name).name.startswith("snapshot-")
    return f"{'archived' if archived else 'live'} {'snapshot' if snapshot else 'segment'}"


# --- the tests -------------------------------------------------------------------------


def test_every_bit_flip_is_refused_at_start_up_or_reported_by_verify(pristine, tmp_path):
    flips = sample_flips(pristine, FLIPS)
    repair_quota = -(-REPAIRS // 4)  # per kind of file
    repaired: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    silent: list[str] = []
    for name, offset, bit in flips:
        data_dir = fresh_copy(pristine, tmp_path / "data")
        target = data_dir / name
        flip(target, offset, bit)
        what = f"bit {bit} of byte {offset} of {name}"
        seq = pristine.seq_of(name, offset)
        kinds[file_kind(name)] += 1
        counts["tried"] += 1
        if name.endswith(SEAL_SUFFIX):
            code, report = kvd_journal("verify", "--data-dir", str(data_dir))
            assert code == 0, (what, report)  # a seal is not part of the record
            loaded = start_up(data_dir)
            if (loaded.entries, loaded.last_seq, loaded.head) != (pristine.states[-1], pristine.last_seq, pristine.head):
                silent.append(f"{what}: start-up loaded a different state (seq {loaded.last_seq})")
            counts["seal ignored"] += 1
            continue

        code, report = kvd_journal("verify", "--data-dir", str(data_dir))
        damaged = [line for line in report.splitlines() if line.startswith("DAMAGED: ")]
        if code == 1:
            counts["verify"] += 1
            assert any(str(target) in line for line in damaged), (what, report)
            if seq is not None:
                assert any(f"{target} at byte" in line and f"(seq {seq})" in line for line in damaged), (what, report)
        else:
            assert code == 0, (what, report)

        try:
            loaded = start_up(data_dir)
        except JournalCorrupt as exc:
            counts["start-up"] += 1
            assert exc.path == target and exc.seq == seq, (what, str(exc))
            assert str(target) in str(exc) and f"(seq {seq})" in str(exc)
        except SnapshotCorrupt as exc:
            counts["start-up"] += 1
            assert exc.path == target and str(target) in str(exc), (what, str(exc))
        else:
            same = (loaded.entries, loaded.last_seq, loaded.head) == (
                pristine.states[-1], pristine.last_seq, pristine.head,
            )
            if not same:
                silent.append(f"{what}: start-up loaded a different state (seq {loaded.last_seq})")
            elif code != 1:
                silent.append(f"{what}: neither start-up nor verify noticed")
            else:
                counts["verify only"] += 1
                assert name.startswith(ARCHIVE_DIR + "/"), what  # start-up reads every live file

        if repaired[file_kind(name)] < repair_quota:
            repaired[file_kind(name)] += 1
            check_repair(pristine, data_dir, name, seq)

    print(
        f"\nbit flips (seed {SEED}): {dict(counts)}; by file: {dict(kinds)}; "
        f"repaired: {dict(repaired)}; silent: {len(silent)}"
    )
    assert silent == []
    assert counts["tried"] == len(flips) >= FLIPS
    in_records = counts["tried"] - counts["seal ignored"]
    assert counts["verify"] == in_records  # verify alone catches every one of them
    assert counts["start-up"] + counts["verify only"] == in_records
    every_kind = ("live segment", "live snapshot", "archived segment", "archived snapshot")
    assert all(kinds[kind] for kind in (*every_kind, "live seal"))
    assert all(repaired[kind] == min(repair_quota, kinds[kind]) for kind in every_kind)


def check_repair(pristine: Pristine, data_dir: Path, name: str, seq: int | None) -> None:
    """``repair`` on a damaged copy: the store opens with every record before the damage, cut bytes kept."""
    before = {str(path.relative_to(data_dir)): path.read_bytes() for path in data_dir.rglob("*.jsonl")}
    code, report = kvd_journal("repair", "--data-dir", str(data_dir))
    what = f"repair after a flip in {name}"
    loaded = start_up(data_dir)
    assert loaded.entries == pristine.states[loaded.last_seq], what
    if name.startswith(ARCHIVE_DIR + "/") and not Path(name).name.startswith("snapshot-"):
        # Repair cuts only what start-up reads; damaged archived records stay as evidence.
        assert code == 1 and "archived history is left as evidence" in report, (what, report)
        assert loaded.last_seq == pristine.last_seq
        assert not (data_dir / QUARANTINE_DIR).exists()
        return
    assert code == 0, (what, report)
    assert "verifies; head seq" in report, (what, report)
    if seq is not None:  # a live record: it and everything after it are cut, nothing before
        assert loaded.last_seq == seq - 1, (what, report)
    else:  # a snapshot: the state is rebuilt from the archive, nothing lost
        assert loaded.last_seq == pristine.last_seq, (what, report)
    assert kvd_journal("verify", "--data-dir", str(data_dir))[0] == 0
    quarantine = data_dir / QUARANTINE_DIR
    manifests = list(quarantine.glob("*-repair.json"))
    assert len(manifests) == 1, (what, report)
    cuts = json.loads(manifests[0].read_text())["cuts"]
    assert any(cut["source"] == name for cut in cuts), (what, cuts)
    for cut in cuts:  # every cut byte is in quarantine, exactly as it was
        original = before[cut["source"]]
        assert (quarantine / cut["quarantined_as"]).read_bytes() == original[cut["offset"]:], cut


def test_flipped_final_newline_of_the_last_record_is_damage_not_a_torn_tail(pristine, tmp_path):
    """Every record was acknowledged: a last line whose newline became another byte must not be cut.

    A torn write leaves a prefix of a record; a whole record followed by one
    stray byte is an acknowledged record with a damaged newline.
    """
    name, offset = last_newline(pristine)
    for bit in range(8):
        data_dir = fresh_copy(pristine, tmp_path / "data")
        flip(data_dir / name, offset, bit)
        code, report = kvd_journal("verify", "--data-dir", str(data_dir))
        assert code == 1 and f"(seq {pristine.last_seq}): unterminated record" in report, report
        assert "torn" not in report
        with pytest.raises(JournalCorrupt) as refused:
            start_up(data_dir)
        assert refused.value.path == data_dir / name and refused.value.seq == pristine.last_seq
        assert (data_dir / name).stat().st_size == offset + 1  # start-up cut nothing


def outcome(data_dir: Path) -> tuple:
    """What start-up makes of ``data_dir``: the damage it names, or the state it loads."""
    try:
        loaded = start_up(data_dir)
    except (JournalCorrupt, SnapshotCorrupt) as exc:
        return type(exc).__name__, str(exc)
    return "loaded", loaded.entries, loaded.last_seq, loaded.head


def test_bit_flips_in_live_segments_end_the_same_with_the_replay_helper(pristine, tmp_path, monkeypatch):
    """Start-up's helper process (kvd/log/scan_ahead.py) forced on, in 1 KiB chunks: for
    each flip in a live segment, start-up names the same damage (file, byte, seq, reason)
    or loads the same state as the reader alone."""
    flips = [flip_ for flip_ in sample_flips(pristine, FLIPS) if file_kind(flip_[0]) == "live segment"]
    flips = flips[:40]
    tried: Counter[str] = Counter()
    started = scan_ahead.ScanAhead.__init__

    def counted(self, chunks):  # noqa: ANN001
        tried["helpers"] += 1
        started(self, chunks)

    for name, offset, bit in flips:
        data_dir = fresh_copy(pristine, tmp_path / "data")
        flip(data_dir / name, offset, bit)
        alone = outcome(data_dir)
        with monkeypatch.context() as patched:
            patched.setattr(scan_ahead, "MIN_HELPER_BYTES", 0)
            patched.setattr(scan_ahead, "CHUNK_BYTES", 1024)
            patched.setattr(scan_ahead, "usable_cpus", lambda: 2)
            patched.setattr(scan_ahead.ScanAhead, "__init__", counted)
            helped = outcome(data_dir)
        assert helped == alone, f"bit {bit} of byte {offset} of {name}"
        tried[alone[0]] += 1
    assert len(flips) >= 20 and tried["JournalCorrupt"] >= 10, tried
    assert tried["helpers"] == len(flips)
