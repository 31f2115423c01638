"""The kill loop (``kvd torture``): short runs that must lose nothing, and proof that its checks bite.

The slow tests run real ``kvd serve`` processes and SIGKILL them; the rest
feed the checker states that a lossy server would show and assert that it
reports them, so that "0 lost" means something.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvd.torture import (
    ABSENT,
    GONE,
    MARKER,
    Answer,
    Client,
    InFlight,
    KeyState,
    Op,
    Torture,
    UsageError,
    build_parser,
    check_state,
    merge_patch,
    prepare_directory,
    report,
)

NOW = 1_800_000_000.0
V1 = {"w": 0, "n": 1}
V2 = {"w": 0, "n": 2}


# --- the checker, fed states by hand ---------------------------------------------


def test_check_passes_a_store_that_holds_exactly_the_acknowledged_state():
    acked = {"a": KeyState(V1, 5), "b": GONE, "c": KeyState(V2, 7, (NOW + 60, NOW + 61))}
    result = check_state(acked, [], {"a": V1, "c": V2}, NOW, NOW + 0.01)
    assert result.violations == []
    assert result.resolved == acked and result.applied == {}


def test_check_reports_a_missing_acknowledged_write():
    result = check_state({"a": KeyState(V1, 5), "b": KeyState(V2, 6)}, [], {"b": V2}, NOW, NOW)
    assert len(result.violations) == 1
    assert "'a'" in result.violations[0] and "lost" in result.violations[0]


def test_check_reports_an_older_value_in_place_of_the_acknowledged_one():
    result = check_state({"a": KeyState(V2, 6)}, [], {"a": V1}, NOW, NOW)
    assert len(result.violations) == 1 and "differs" in result.violations[0]


def test_check_reports_a_deleted_key_that_came_back():
    result = check_state({"a": GONE}, [], {"a": V1}, NOW, NOW)
    assert len(result.violations) == 1 and "deleted, cleared or expired key is back" in result.violations[0]


def test_check_reports_an_expired_key_that_came_back():
    expired = KeyState(V1, 5, (NOW - 3.0, NOW - 2.9))
    result = check_state({"a": expired}, [], {"a": V1}, NOW, NOW + 0.01)
    assert len(result.violations) == 1 and "expired key is back" in result.violations[0]
    # ...and finds it absent, as it must be, without complaint.
    result = check_state({"a": expired}, [], {}, NOW, NOW + 0.01)
    assert result.violations == [] and result.expired_checked == 1


def test_check_accepts_either_state_while_an_expiry_may_or_may_not_have_passed():
    window = KeyState(V1, 5, (NOW - 0.02, NOW + 0.02))
    assert check_state({"a": window}, [], {"a": V1}, NOW, NOW).violations == []
    assert check_state({"a": window}, [], {}, NOW, NOW).violations == []
    # Before the window opens the key must still be there.
    later = KeyState(V1, 5, (NOW + 5, NOW + 6))
    assert len(check_state({"a": later}, [], {}, NOW, NOW).violations) == 1


def test_check_reports_a_key_nobody_wrote():
    result = check_state({"a": GONE}, [], {"stray": 1}, NOW, NOW)
    assert len(result.violations) == 1 and "no writer wrote it" in result.violations[0]


def test_check_accepts_an_in_flight_write_applied_or_not_and_resolves_it():
    in_flight = [InFlight("put", {"a": KeyState(V2)})]
    acked = {"a": KeyState(V1, 5)}
    not_applied = check_state(acked, in_flight, {"a": V1}, NOW, NOW)
    assert not_applied.violations == [] and not_applied.resolved["a"] == KeyState(V1, 5)
    applied = check_state(acked, in_flight, {"a": V2}, NOW, NOW)
    assert applied.violations == [] and applied.applied == {"a": True}
    assert applied.resolved["a"].value == V2
    # A third value is explained by neither.
    assert len(check_state(acked, in_flight, {"a": {"other": 1}}, NOW, NOW).violations) == 1


def test_check_accepts_an_in_flight_delete_recreating_nothing():
    in_flight = [InFlight("delete", {"a": GONE})]
    assert check_state({"a": KeyState(V1, 5)}, in_flight, {}, NOW, NOW).violations == []
    # An in-flight write to one key explains nothing about another.
    result = check_state({"a": KeyState(V1, 5), "b": KeyState(V1, 4)}, in_flight, {}, NOW, NOW)
    assert len(result.violations) == 1 and "'b'" in result.violations[0]


def test_check_reports_a_half_applied_in_flight_batch():
    acked = {"a": KeyState(V1, 5), "b": KeyState(V1, 6)}
    batch = [InFlight("batch", {"a": KeyState(V2), "b": KeyState(V2)})]
    assert check_state(acked, batch, {"a": V2, "b": V2}, NOW, NOW).violations == []
    assert check_state(acked, batch, {"a": V1, "b": V1}, NOW, NOW).violations == []
    half = check_state(acked, batch, {"a": V2, "b": V1}, NOW, NOW)
    assert len(half.violations) == 1 and "half applied" in half.violations[0]


def test_check_reports_a_half_applied_in_flight_clear():
    acked = {"a": KeyState(V1, 5), "b": KeyState(V1, 6), "c": GONE}
    clear = [InFlight("clear", dict.fromkeys(acked, GONE))]
    assert check_state(acked, clear, {}, NOW, NOW).violations == []
    assert check_state(acked, clear, {"a": V1, "b": V1}, NOW, NOW).violations == []
    half = check_state(acked, clear, {"a": V1}, NOW, NOW)
    assert len(half.violations) == 1 and "half applied" in half.violations[0]


def test_merge_patch_follows_rfc_7396():
    assert merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"a": None, "b": {"c": 9}, "e": [1]}) == {
        "b": {"c": 9, "d": 3}, "e": [1]
    }
    assert merge_patch([1], {"a": 1}) == {"a": 1} and merge_patch({"a": 1}, "x") == "x"


# --- the answers checked while writing ---------------------------------------------


class NoServer:
    port = 0


def client_with(model: dict[str, KeyState]) -> Client:
    import threading

    return Client(NoServer(), model, threading.Event(), cycle=1)  # type: ignore[arg-type]


def answer(status: int, body: object = None, etag: int | None = None) -> Answer:
    headers = {"etag": f'"{etag}"'} if etag is not None else {}
    return Answer(status, headers, json.dumps(body).encode() if body is not None else b"")


def test_a_404_for_a_key_that_must_exist_is_a_loss():
    client = client_with({"a": KeyState(V1, 5)})
    op = Op("patch", "PATCH", "/keys/a", b"{}", {}, ["a"], {"a": V1}, sent=time.time())
    assert client.accept(op, answer(404), time.time()) == (False, None)
    assert len(client.violations) == 1 and "lost" in client.violations[0]
    # A key whose expiry may have passed may answer 404: no violation.
    client = client_with({"a": KeyState(V1, 5, (time.time() - 1, time.time() - 0.5))})
    op = Op("delete", "DELETE", "/keys/a", None, {}, ["a"], sent=time.time())
    assert client.accept(op, answer(404), time.time()) == (False, None)
    assert client.violations == [] and client.model["a"] is GONE


def test_a_201_created_for_a_key_that_exists_is_a_loss():
    client = client_with({"a": KeyState(V1, 5)})
    op = Op("put", "PUT", "/keys/a", b"{}", {}, ["a"], {"a": V2}, sent=time.time())
    assert client.accept(op, answer(201, {"a": V2}, etag=9), time.time()) == (True, 9)
    assert len(client.violations) == 1 and "201" in client.violations[0]
    assert client.model["a"] == KeyState(V2, 9)


def test_a_200_replaced_for_a_deleted_key_is_a_resurrection():
    client = client_with({"a": GONE})
    op = Op("put", "PUT", "/keys/a", b"{}", {}, ["a"], {"a": V2}, sent=time.time())
    client.accept(op, answer(200, {"a": V2}, etag=9), time.time())
    assert len(client.violations) == 1 and "back" in client.violations[0]


def test_a_wrong_answer_body_or_status_is_an_error():
    client = client_with({"a": GONE, "b": GONE})
    op = Op("batch", "PUT", "/keys", b"{}", {}, ["a", "b"], {"a": V1, "b": V1}, sent=time.time())
    client.accept(op, answer(200, {"revision": 3, "stored": ["a"]}), time.time())
    client.accept(op, answer(500, {"error": {}}), time.time())
    assert len(client.errors) == 2 and client.violations == []


def test_an_acknowledged_expiring_write_gets_the_window_between_send_and_answer():
    client = client_with({"a": GONE})
    op = Op("put", "PUT", "/keys/a?expire_in=2", b"{}", {}, ["a"], {"a": V1}, 2.0, sent=NOW)
    client.accept(op, answer(201, {"a": V1}, etag=4), NOW + 0.5)
    assert client.model["a"] == KeyState(V1, 4, (NOW + 2.0, NOW + 2.5))


# --- the directory ------------------------------------------------------------------


def test_torture_refuses_a_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "00000000000000000001.jsonl").write_text("production data\n")
    with pytest.raises(UsageError, match="refusing"):
        prepare_directory(precious)
    assert sorted(path.name for path in precious.iterdir()) == ["00000000000000000001.jsonl"]
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        prepare_directory(file)


def test_torture_takes_an_empty_absent_or_earlier_torture_directory(tmp_path):
    prepare_directory(tmp_path / "new")
    assert (tmp_path / "new" / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    prepare_directory(tmp_path / "empty")
    earlier = tmp_path / "new"
    (earlier / "data").mkdir()
    (earlier / "data" / "00000000000000000001.jsonl").write_text("old torture data\n")
    (earlier / "mine.txt").write_text("not made by torture\n")
    prepare_directory(earlier)
    assert not (earlier / "data").exists()  # the old run's store is replaced
    assert (earlier / "mine.txt").exists()  # nothing else is touched


def test_build_parser_registers_torture_on_a_subcommand_table():
    parser = argparse.ArgumentParser(prog="kvd")
    build_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["torture", "--data-dir", "D", "--cycles", "3", "--seed", "7",
                              "--writers", "2", "--archive"])
    assert (args.command, args.data_dir, args.cycles, args.seed, args.writers, args.archive) == (
        "torture", "D", 3, 7, 2, True
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["torture", "--data-dir", "D", "--cycles", "0"])


# --- real servers, really killed ---------------------------------------------------


def run_torture(directory: Path, cycles: int, **options) -> tuple[Torture, str]:
    out = io.StringIO()
    torture = Torture(directory, out=out, **options)
    prepare_directory(directory)
    torture.run(cycles)
    return torture, out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fsync", "archive", "cycles"),
    [("always", False, 16), ("everysec", True, 8)],
    ids=["always", "everysec-archive"],
)
def test_kill_loop_loses_no_acknowledged_write(tmp_path, fsync, archive, cycles):
    torture, output = run_torture(
        tmp_path / "torture", cycles, seed=cycles, fsync=fsync, archive=archive,
        max_kill_delay=1.0, clear_chance=0.3,
    )
    figures = torture.figures
    assert figures.failure is None, output
    assert (figures.lost, figures.errors, figures.verify_failures) == (0, 0, 0), output
    assert figures.final_verify == "ok" and figures.passed, output
    assert figures.cycles == cycles and figures.verify_runs == cycles + 1
    # The run did what it claims: many writes of every kind, killed mid-flight.
    writes = figures.writes
    assert figures.checked >= 40 * cycles, output
    assert min(writes.puts, writes.batches, writes.patches, writes.deletes) > 0, output
    assert figures.kills_with_writes_in_flight >= cycles // 2, output
    assert figures.compactions > 0, output
    assert len(output.splitlines()) == cycles and "0 lost" in output.splitlines()[-1]
    if archive:
        assert (torture.data_dir / "archive").is_dir()


def cut_journal_at(data_dir: Path, seq: int) -> int:
    """Remove record ``seq`` and every record after it, as if they were never written.

    The journal that is left is a valid, shorter one (the chain cannot show a
    cut-off end). Returns how many records were removed.
    """
    segments = sorted(data_dir.glob("[0-9]*.jsonl"))
    assert not list(data_dir.glob("snapshot-*")), "a snapshot may hold the record"
    removed = 0
    for path in segments:
        lines = path.read_bytes().splitlines(keepends=True)
        seqs = [json.loads(line)["seq"] if line.endswith(b"\n") else None for line in lines]
        # By the name: a segment rolled just before the kill may hold only a torn record.
        if int(path.stem) >= seq:
            removed += len(lines)
            path.unlink()
        elif seq in seqs:
            at = seqs.index(seq)
            removed += len(lines) - at
            path.write_bytes(b"".join(lines[:at]))
    return removed


NO_COMPACTION = {"KVD_JOURNAL_COMPACT_MIN_DEAD_BYTES": str(1 << 40)}


@pytest.mark.slow
def test_kill_loop_detects_acknowledged_records_cut_from_the_journal(tmp_path):
    cut: list[int] = []

    def drop_last_cycle(torture: Torture, cycle: int) -> None:
        if cycle == 2:
            first = min(torture.acked)  # the oldest write acknowledged in this cycle
            cut.append(cut_journal_at(torture.data_dir, first))

    torture, output = run_torture(
        tmp_path / "torture", 4, seed=11, min_kill_delay=0.6, max_kill_delay=0.8,
        clear_chance=0.0, settings=NO_COMPACTION, between_cycles=drop_last_cycle,
    )
    figures = torture.figures
    assert cut and cut[0] > 0
    assert figures.lost > 0 and not figures.passed, output
    assert figures.failure is not None and figures.failure.startswith("cycle 2"), output
    assert figures.cycles == 2  # it stopped there, leaving the evidence
    assert "LOST: key " in output, output  # found by the model check...
    assert "before the highest acknowledged revision" in output  # ...and by the head check
    assert figures.verify_failures == 0  # a cut-off end is a valid journal: verify alone misses it


@pytest.mark.slow
def test_kill_loop_reports_a_journal_that_fails_verify(tmp_path):
    def flip_early_byte(torture: Torture, cycle: int) -> None:
        if cycle == 1:
            first = sorted(torture.data_dir.glob("[0-9]*.jsonl"))[0]
            content = bytearray(first.read_bytes())
            assert content.count(b"\n") > 2
            at = content.index(b"xxxx")  # inside the first value's padding, not the last record
            content[at] = ord("y")
            first.write_bytes(bytes(content))

    torture, output = run_torture(
        tmp_path / "torture", 3, seed=5, min_kill_delay=0.5, max_kill_delay=0.6,
        settings=NO_COMPACTION, between_cycles=flip_early_byte,
    )
    figures = torture.figures
    assert figures.verify_failures == 1 and figures.final_verify == "FAILED", output
    assert not figures.passed and figures.cycles == 1
    assert "DAMAGED" in output, output
    assert "FAILED" in report(figures, "kvd torture ...")


def kvd_torture(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KVD_")}
    return subprocess.run(
        [sys.executable, "-m", "kvd.torture", *args], capture_output=True, text=True,
        timeout=timeout, env=env, cwd=Path(__file__).resolve().parent.parent,
    )


@pytest.mark.slow
def test_kvd_torture_command_prints_progress_and_a_report_and_exits_0(tmp_path):
    directory = tmp_path / "disk"
    finished = kvd_torture("--data-dir", str(directory), "--cycles", "2", "--seed", "3",
                           "--writers", "2", "--max-kill-delay", "0.4")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = finished.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("cycle ")] == [
        "cycle 1/2", "cycle 2/2"
    ]
    assert "kvd torture: PASSED" in lines
    for field_name in ("cycles (SIGKILLs):           2", "lost:                        0",
                       "verify:                      ok", "duration:", "acknowledged writes checked:"):
        assert any(field_name in line for line in lines), (field_name, finished.stdout)
    # Run again on the directory it made: allowed, and starts over.
    again = kvd_torture("--data-dir", str(directory), "--cycles", "1", "--max-kill-delay", "0.2")
    assert again.returncode == 0, again.stdout + again.stderr


def test_kvd_torture_command_exits_2_on_a_directory_that_is_not_its_own(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "LOCK").write_text("123\n")
    finished = kvd_torture("--data-dir", str(precious), "--cycles", "1")
    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert "refusing" in finished.stderr
    assert [path.name for path in precious.iterdir()] == ["LOCK"]


def test_absent_state_is_not_a_json_value():
    assert ABSENT != None and GONE.absent  # noqa: E711 - null is a value kvd stores
