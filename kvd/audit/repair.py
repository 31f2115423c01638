"""``kvd journal repair``: move what stops the store from opening into quarantine/.

Nothing is deleted: cut bytes are moved (fsynced) beside a manifest that
says where each came from and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from kvd.audit.base import EXIT_FAILURE, EXIT_OK, error, file_size, lock_for_writing
from kvd.audit.verify import Verification, verification_report, verify_directory
from kvd.config import Config
from kvd.log.format import GENESIS_HASH, format_ts
from kvd.log.history import ARCHIVE_DIR, QUARANTINE_DIR, Layout
from kvd.log.reader import (
    CHAIN_BROKEN,
    JournalCorrupt,
    JournalReader,
    TornTail,
    segment_first_seq,
    segments_from,
)
from kvd.log.snapshot import (
    SnapshotCorrupt,
    SnapshotHeader,
    fsync_directory,
    is_snapshot_name,
    read_snapshot,
    snapshot_seq,
)


@dataclass(frozen=True)
class Cut:
    """Bytes to move into quarantine: ``source`` from ``offset`` to its end (0: the whole file)."""

    source: Path
    offset: int
    length: int
    seqs: tuple[int, int] | None  # the records the bytes seem to hold, when they can be read
    reason: str


@dataclass
class RepairPlan:
    """What ``repair`` will do, worked out before anything changes."""

    restore: list[Path] = field(default_factory=list)  # archived files to move back to live
    cuts: list[Cut] = field(default_factory=list)
    refusal: str | None = None
    base_seq: int = 0  # the state start-up will load after the repair

    @property
    def empty(self) -> bool:
        return not self.restore and not self.cuts


@dataclass(frozen=True)
class _Base:
    """A state start-up can load: a snapshot's, or the empty store's (seq 0, no snapshot)."""

    seq: int
    head: str
    snapshot: Path | None


def plan_repair(directory: Path) -> RepairPlan:
    """Find what stops the store from opening, and what to move so that it opens.

    Start-up reads the newest live snapshot and the live segments after it.
    A damaged (or missing) base is replaced by an older one when the archive
    can rebuild it; otherwise the repair is refused and nothing changes.
    Then the first damaged record and everything after it is cut. Damaged
    snapshots are quarantined. Damaged archived segments are left alone:
    start-up does not read them, and cutting them would destroy evidence.
    Live segments the base wholly covers are cut whole when start-up's check
    of them fails (``_covered_cuts``).
    """
    layout = Layout.scan(directory)
    plan = RepairPlan()
    damaged: dict[Path, str] = {}
    intact: dict[Path, SnapshotHeader] = {}
    for path in layout.all_snapshots:
        try:
            header, entries = read_snapshot(path)
            for _ in entries:
                pass
            intact[path] = header
        except SnapshotCorrupt as exc:
            damaged[path] = exc.reason
    for path, reason in damaged.items():
        plan.cuts.append(Cut(path, 0, file_size(path), None, f"snapshot damaged: {reason}"))

    base = layout.base_snapshot
    live = layout.segments
    live_first = segment_first_seq(live[0]) if live else None
    if base is not None and base in intact:
        chosen = _Base(intact[base].seq, intact[base].head, base)
    elif base is None and (live_first is None or live_first == 1):
        chosen = _Base(0, GENESIS_HASH, None)
    else:
        # The base is damaged, or missing while the live records start later than seq 1.
        need = snapshot_seq(base) if base is not None else live_first - 1  # type: ignore[operator]
        fallback = _fallback(layout, intact, need)
        if fallback is None:
            what = (
                f"the newest snapshot {base} is damaged ({damaged[base]})" if base is not None
                else f"the live records start at seq {live_first} but no snapshot ends at seq {need}"
            )
            plan.refusal = (
                f"{what}, and no older base (an intact older snapshot with the records after "
                f"it, or the archive from seq 1) can rebuild the state at seq {need}: repairing "
                "would lose everything after it. Nothing was changed; restore it from a backup."
            )
            return plan
        chosen, plan.restore = fallback
    plan.base_seq = chosen.seq

    # The segments start-up will read once the restored files are back.
    restored_segments = [path for path in plan.restore if not is_snapshot_name(path.name)]
    after_restore = sorted(live + restored_segments, key=segment_first_seq)
    segments = segments_from(after_restore, chosen.seq + 1)
    covered = [path for path in after_restore if path not in segments]
    plan.cuts.extend(_covered_cuts(covered, segments, chosen))
    reader = JournalReader(segments=segments, start_seq=chosen.seq + 1, start_hash=chosen.head)
    try:
        for _ in reader.records():
            pass
    except JournalCorrupt as exc:
        if exc.seq <= chosen.seq:
            plan.refusal = (
                f"{exc}; the damage is before the snapshot at seq {chosen.seq}, in a segment that "
                "also holds later records, so cutting it would lose those too. Nothing was "
                "changed; restore the segment from a backup."
            )
            return plan
        if exc.seq == chosen.seq + 1 and chosen.snapshot is not None and exc.reason.startswith(CHAIN_BROKEN):
            return _snapshot_head_or_records(layout, intact, chosen, exc, plan)
        index = segments.index(exc.path)
        plan.cuts.append(_cut(exc.path, exc.offset, exc.seq, f"damaged: {exc.reason}"))
        for later in segments[index + 1 :]:
            plan.cuts.append(_cut(later, 0, None, f"follows the damage at seq {exc.seq}"))
        return plan
    torn = reader.torn_tail
    if torn is not None:
        plan.cuts.append(_cut(torn.path, torn.offset, None, "torn last record (never acknowledged)"))
    return plan


def _snapshot_head_or_records(
    layout: Layout, intact: dict[Path, SnapshotHeader], chosen: _Base, exc: JournalCorrupt,
    plan: RepairPlan,
) -> RepairPlan:
    """The first record after the base snapshot does not link to the snapshot's ``head``.

    Either the snapshot's header is wrong or every record after it was
    rewritten; cutting the records, as for other damage, would quarantine
    acknowledged writes for what may be the snapshot's fault. When an older
    base and the archive rebuild the state at the snapshot's seq and the
    records after it link on to that, the snapshot is the damaged one: it is
    cut and the older base restored. Otherwise nothing can tell which is
    wrong, and the repair is refused.
    """
    assert chosen.snapshot is not None
    older = {path: header for path, header in intact.items() if path != chosen.snapshot}
    fallback = _fallback(layout, older, chosen.seq)
    if fallback is not None and _first_damage(
        segments_from(layout.all_segments, fallback[0].seq + 1), fallback[0]
    ) is None:  # and the records after the snapshot link on to the archive's
        base, restore = fallback
        plan.cuts.append(Cut(
            chosen.snapshot, 0, file_size(chosen.snapshot), None,
            f"snapshot damaged: its head is not the hash of record {chosen.seq}, which the "
            f"archive holds and record {exc.seq} links to",
        ))
        plan.restore, plan.base_seq = restore, base.seq
        return plan
    plan.refusal = (
        f"{exc}: record {exc.seq} does not link to the head of the snapshot at seq "
        f"{chosen.seq} ({chosen.snapshot.name}). Either the snapshot's header or the records "
        "after it were changed, and no archived history tells which; cutting the records would "
        "put acknowledged writes in quarantine. Nothing was changed; restore the snapshot or "
        "the segments from a backup."
    )
    return plan


def _first_damage(
    segments: list[Path], base: _Base, *, through_base_only: bool = False
) -> JournalCorrupt | None:
    """What stops a read of ``segments`` after ``base`` (None: every record checks out),
    or of the records up to the base's own seq only."""
    reader = JournalReader(segments=segments, start_seq=base.seq + 1, start_hash=base.head)
    try:
        for _ in reader.records():
            if through_base_only:
                break  # the first record after the base: every one before it was checked
    except JournalCorrupt as exc:
        return exc
    return None


def _covered_cuts(covered: list[Path], segments: list[Path], base: _Base) -> list[Cut]:
    """Every live segment holding only records the base covers, when one of them is damaged.

    Start-up checks them up to the base's head before retiring them (a
    compaction stopped before it did). The base holds their effect, so
    moving them all loses no record after it; cutting from the damage on
    instead would leave the earlier ones ending short of the base.
    """
    if not covered:
        return []
    damage = _first_damage(covered + segments, base, through_base_only=True)
    if damage is None or damage.seq > base.seq:
        return []
    reason = (
        f"covered by the snapshot at seq {base.seq}; damaged at seq {damage.seq} "
        f"in {damage.path.name}: {damage.reason}"
    )
    return [_cut(path, 0, None, reason) for path in covered]


def _fallback(
    layout: Layout, intact: dict[Path, SnapshotHeader], need: int
) -> tuple[_Base, list[Path]] | None:
    """An older base whose records reach seq ``need`` unbroken, and the archived files it needs."""
    segments = layout.all_segments
    candidates = [
        _Base(header.seq, header.head, path)
        for path, header in sorted(intact.items(), key=lambda item: -item[1].seq)
        if header.seq < need
    ]
    if segments and segment_first_seq(segments[0]) == 1:
        candidates.append(_Base(0, GENESIS_HASH, None))
    for candidate in candidates:
        needed = segments_from(segments, candidate.seq + 1)
        reader = JournalReader(segments=needed, start_seq=candidate.seq + 1, start_hash=candidate.head)
        try:
            for _ in reader.records():
                pass
            reached = reader.last_seq
        except JournalCorrupt as exc:
            reached = exc.seq - 1
        if reached < need:
            continue
        restore = [path for path in needed if path.parent.name == ARCHIVE_DIR]
        if candidate.snapshot is not None and candidate.snapshot.parent.name == ARCHIVE_DIR:
            restore.append(candidate.snapshot)
        return candidate, restore
    return None


def _cut(path: Path, offset: int, first_seq: int | None, reason: str) -> Cut:
    length = file_size(path) - offset
    seqs = _seqs_in(path, offset)
    if first_seq is not None and seqs is not None:
        seqs = (first_seq, max(first_seq, seqs[1]))
    elif first_seq is not None:
        seqs = (first_seq, first_seq)
    return Cut(path, offset, length, seqs, reason)


def _seqs_in(path: Path, offset: int) -> tuple[int, int] | None:
    """The lowest and highest ``seq`` of the lines from ``offset`` that still parse (best effort)."""
    seqs = []
    with open(path, "rb") as file:
        file.seek(offset)
        for line in file:
            try:
                seq = orjson.loads(line).get("seq")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(seq, int):
                seqs.append(seq)
    return (min(seqs), max(seqs)) if seqs else None


def apply_repair(directory: Path, plan: RepairPlan) -> list[tuple[Cut, Path]]:
    """Carry out ``plan``: restore, then quarantine; every step fsynced, nothing deleted.

    Order matters for a crash half-way: the older base is put back before the
    damaged one leaves, so the directory never lacks a base, and running
    ``repair`` again finishes the job. Returns each cut with where it went.
    """
    archive = directory / ARCHIVE_DIR
    for path in plan.restore:
        os.replace(path, directory / path.name)
        fsync_directory(archive)
        fsync_directory(directory)
    quarantine = directory / QUARANTINE_DIR
    if plan.cuts and not quarantine.is_dir():
        quarantine.mkdir()
        fsync_directory(directory)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved: list[tuple[Cut, Path]] = []
    for cut in plan.cuts:
        source = _where_now(directory, cut.source, plan.restore)
        origin = f"{ARCHIVE_DIR}-{source.name}" if source.parent.name == ARCHIVE_DIR else source.name
        name = f"{stamp}-{origin}" + (f"-from-byte-{cut.offset}" if cut.offset else "")
        target = _unused(quarantine / name)
        if cut.offset == 0:
            # A whole file moves: one rename. A segment emptied by truncation would
            # keep a name that no longer matches its first record.
            os.replace(source, target)
            fsync_directory(quarantine)
            fsync_directory(source.parent)
        else:
            _copy_tail(source, cut.offset, target)
            fsync_directory(quarantine)
            with open(source, "r+b") as file:
                file.truncate(cut.offset)
                file.flush()
                os.fsync(file.fileno())
        moved.append((cut, target))
    if moved:
        _write_manifest(_unused(quarantine / f"{stamp}-repair.json"), directory, moved, plan)
    return moved


def _where_now(directory: Path, path: Path, restored: list[Path]) -> Path:
    return directory / path.name if path in restored else path


def _unused(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``... when a repair in the same second took it."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _copy_tail(source: Path, offset: int, target: Path) -> None:
    """Copy ``source`` from ``offset`` to a new file, atomically (temp, fsync, rename)."""
    temp = target.with_name(target.name + ".tmp")
    with open(source, "rb") as reader, open(temp, "wb") as writer:
        reader.seek(offset)
        while chunk := reader.read(1 << 20):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(temp, target)


def _write_manifest(
    path: Path, directory: Path, moved: list[tuple[Cut, Path]], plan: RepairPlan
) -> None:
    """A note beside the cut bytes saying where each came from and why."""
    manifest = {
        "repaired_at": format_ts(time.time()),
        "base_seq": plan.base_seq,
        "restored_from_archive": [path.name for path in plan.restore],
        "cuts": [
            {
                "source": str(cut.source.relative_to(directory)),
                "offset": cut.offset,
                "bytes": cut.length,
                "seqs": list(cut.seqs) if cut.seqs else None,
                "reason": cut.reason,
                "quarantined_as": target.name,
            }
            for cut, target in moved
        ],
    }
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as file:
        file.write(json.dumps(manifest, indent=2).encode() + b"\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    fsync_directory(path.parent)


def verify_as_repaired(directory: Path, plan: RepairPlan) -> Verification:
    """What ``verify`` would find once ``plan`` is applied, with nothing in ``directory`` changed.

    ``verify`` runs on a shadow of the directory as the repair would leave it,
    in a temporary directory: a symlink for every segment and snapshot kept
    whole (the restored ones in the live directory), a copy of the part kept
    of each file cut short (at most a segment), nothing for the files cut
    whole. Its findings name the files where the repair would leave them.
    """
    layout = Layout.scan(directory)
    archived = set(layout.archived_segments + layout.archived_snapshots)
    cut_whole = {cut.source for cut in plan.cuts if cut.offset == 0}
    kept = {cut.source: cut.offset for cut in plan.cuts if cut.offset}
    with tempfile.TemporaryDirectory(prefix="kvd-repair-dry-run-") as temp:
        shadow = Path(temp) / "data"
        (shadow / ARCHIVE_DIR).mkdir(parents=True)
        # Live files first: a restored file replaces a live one of the same name, as os.replace does.
        for path in layout.segments + layout.snapshots + layout.archived_segments + layout.archived_snapshots:
            if path in cut_whole:
                continue
            stays_archived = path in archived and path not in plan.restore
            target = (shadow / ARCHIVE_DIR if stays_archived else shadow) / path.name
            target.unlink(missing_ok=True)
            if path in kept:
                _copy_head(path, kept[path], target)
            else:
                target.symlink_to(path.absolute())
        result = verify_directory(shadow)
    return _seen_from(result, shadow, directory)


def _copy_head(source: Path, length: int, target: Path) -> None:
    """The first ``length`` bytes of ``source``, what a cut at that offset keeps, to ``target``."""
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while length > 0 and (chunk := reader.read(min(length, 1 << 20))):
            writer.write(chunk)
            length -= len(chunk)


def _seen_from(result: Verification, shadow: Path, directory: Path) -> Verification:
    """``result`` of verifying ``shadow``, its paths put back under ``directory``."""

    def moved(where: str) -> str:
        prefix = str(shadow)
        return str(directory) + where[len(prefix):] if where.startswith(prefix) else where

    torn = result.torn_tail
    return dataclasses.replace(
        result,
        directory=directory,
        damage=[dataclasses.replace(finding, file=moved(finding.file)) for finding in result.damage],
        torn_tail=None if torn is None else TornTail(Path(moved(str(torn.path))), torn.offset, torn.length),
    )


def run(directory: Path, args: argparse.Namespace, config: Config) -> int:
    """Plan, apply (unless --dry-run) and verify again; exit 0 only when verify then passes.

    A dry run verifies the store as the repair would leave it (``verify_as_repaired``),
    so it exits as the repair would and says why.
    """
    lock = lock_for_writing(directory, "`kvd journal verify` works beside it, read-only")
    try:
        plan = plan_repair(directory)
        if plan.refusal is not None:
            error(plan.refusal)
            return EXIT_FAILURE
        if plan.empty:
            print("nothing to repair: the snapshot and the records start-up reads are intact")
        if args.dry_run:
            for path in plan.restore:
                print(f"would restore {path} to {directory} (for the older base start-up will load)")
            for cut in plan.cuts:
                print(f"would cut {_describe_cut(cut)}: {cut.reason}")
            return _after_repair(verify_as_repaired(directory, plan), dry_run=True)
        moved = apply_repair(directory, plan)
        for path in plan.restore:
            print(f"restored {path} to {directory} (for the older base start-up will load)")
        for cut, target in moved:
            print(f"cut {_describe_cut(cut)} -> {target}: {cut.reason}")
    finally:
        lock.release()
    return _after_repair(verify_directory(directory), dry_run=False)


def _after_repair(result: Verification, *, dry_run: bool) -> int:
    """Report what ``verify`` finds after the repair (would find, for a dry run); the exit status."""
    verifies, opens, finds = (
        ("would verify", "would open", "would still find") if dry_run else ("verifies", "opens", "still finds")
    )
    if result.ok:
        print(f"after repair: {result.directory} {verifies}; head seq {result.head_seq}, "
              f"hash {result.head_hash}")
        return EXIT_OK
    print(f"after repair the store {opens}, but verify {finds} damage that repair does not cut:")
    for line in verification_report(result):
        print(f"  {line}")
    print("  (repair cuts only what start-up reads, the newest snapshot and the live segments; "
          "older and archived history is left as evidence: restore the file from a backup, "
          "or move it out of the data directory)")
    return EXIT_FAILURE


def _describe_cut(cut: Cut) -> str:
    seqs = f"seq {cut.seqs[0]}..{cut.seqs[1]}, " if cut.seqs else ""
    where = f"{cut.source} from byte {cut.offset}" if cut.offset else str(cut.source)
    return f"{where} ({seqs}{cut.length} bytes)"

