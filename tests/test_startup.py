"""Start-up as an operator sees it: 503 while replaying, progress, then ready."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import load_bench_module

make_journal = load_bench_module("make_journal").make_journal


@pytest.mark.slow
def test_keys_and_readyz_answer_503_until_replay_is_done(kvd_process, tmp_path):
    data = tmp_path / "data"
    make_journal(data, records=150_000, keys=50_000)
    server = kvd_process(data_dir=data, wait_ready=False)
    seen_before_ready = set()
    ready_gauges_while_replaying = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = server.request("GET", "/metrics")  # scraped before /readyz: still replaying if that is 503
        ready = server.request("GET", "/readyz")
        if ready.status == 200:
            break
        seen_before_ready.add(ready.status)
        assert metrics.status == 200
        ready_gauges_while_replaying.update(re.findall(r"^kvd_ready (\S+)$", metrics.body.decode(), re.M))
        keys = server.request("GET", "/keys/key00000001")
        assert keys.status in (503, 200)
        if keys.status == 503:
            assert keys.json()["error"]["code"] == "unavailable"
            assert keys.headers["Retry-After"] == "1"
        assert server.request("GET", "/healthz").status == 200  # alive throughout
    assert seen_before_ready == {503}
    assert ready_gauges_while_replaying == {"0.0"}  # an alert on kvd_ready == 0 fires during replay
    assert re.search(r"^kvd_ready 1.0$", server.request("GET", "/metrics").body.decode(), re.M)
    # key00000001 was last written by seq 100001 (seq % 50000 == 1)
    assert server.get_key("key00000001").json()["key00000001"].startswith("value-00100001-")
    assert "ready: 50000 keys at revision 150000" in server.log()


def child_pids(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children.update(map(int, (task / "children").read_text().split()))
        except FileNotFoundError:  # a thread that just ended
            continue
    return children


def command_line(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except FileNotFoundError:
        return []


@pytest.fixture
def two_cpus() -> None:
    """Start-up's helper process needs a second usable CPU (the unit tests cover both cases)."""
    from kvd.log import scan_ahead

    if scan_ahead.usable_cpus() < 2:
        pytest.skip("one usable CPU: start-up replays without a helper (the unit tests cover both)")


@pytest.mark.slow
def test_a_large_journal_replays_with_a_helper_process_that_then_exits(kvd_process, tmp_path, two_cpus):
    """Past scan_ahead.MIN_HELPER_BYTES, on two CPUs, a spawned helper checks the later
    part of the journal; the state is the same and no process is left behind."""
    data = tmp_path / "data"
    make_journal(data, records=200_000, keys=70_000)  # 68 MB: the helper's share is past 32 MiB
    server = kvd_process(data_dir=data)
    assert "a helper process checked" in server.log()
    assert "ready: 70000 keys at revision 200000" in server.log()
    # key00000001 was last written by seq 140001 (seq % 70000 == 1), in the helper's part
    assert server.get_key("key00000001").json()["key00000001"].startswith("value-00140001-")
    assert child_pids(server.process.pid) == set()


def gone(pid: int) -> bool:
    """Exited, or a zombie waiting for a reaper (the sandbox's init may not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_killing_kvd_mid_replay_leaves_no_helper_and_no_results(kvd_process, tmp_path, two_cpus):
    """SIGKILL while the helper works: it stops by itself, its temp directory goes,
    and the next start replays everything."""
    data = tmp_path / "data"
    make_journal(data, records=200_000, keys=70_000)
    server = kvd_process(data_dir=data, wait_ready=False)
    deadline = time.monotonic() + 30
    helpers: dict[int, list[bytes]] = {}
    while not helpers and time.monotonic() < deadline:
        argvs = {pid: command_line(pid) for pid in child_pids(server.process.pid)}
        helpers = {pid: argv for pid, argv in argvs.items()
                   if any(b"kvd.log.scan_ahead" in arg for arg in argv)}
    assert helpers, "no helper process appeared"
    ((helper, argv),) = helpers.items()
    (results,) = (Path(arg.decode()) for arg in argv if Path(arg.decode()).name.startswith("kvd-replay-"))
    assert results.name.startswith("kvd-replay-")
    assert server.kill() == -9
    while not gone(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(helper), "the helper outlived its server"
    # Removed by the helper when its report finds the pipe closed; by the next
    # start when the helper was already done and the server died before it could.
    again = kvd_process(data_dir=data)
    assert "ready: 70000 keys at revision 200000" in again.log()
    assert not results.exists()


@pytest.mark.slow
def test_restart_resumes_the_sequence_and_chain(kvd_process, tmp_path):
    server = kvd_process()
    for i in range(5):
        assert server.request("PUT", "/keys", {f"k{i}": i}).json()["revision"] == i + 1
    assert server.kill(15) == 0  # SIGTERM: clean exit
    again = kvd_process()
    assert again.request("GET", "/keys").json() == {f"k{i}": i for i in range(5)}
    assert again.request("PUT", "/keys", {"k5": 5}).json()["revision"] == 6
    from kvd.log.reader import JournalReader

    assert again.kill(15) == 0
    reader = JournalReader(tmp_path / "data")
    assert [record.seq for record in reader.records()] == [1, 2, 3, 4, 5, 6]


def resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_free_heap_memory_goes_back_to_the_os_after_replay():
    """What kvd serve calls once replay is done: freed C-heap blocks stop being resident.

    1 KiB objects come from glibc's heap, not Python's small-object arenas; one
    kept at the top stops glibc from trimming the heap by itself on free.
    """
    import ctypes

    from kvd.server import release_free_memory

    try:
        ctypes.CDLL(None).malloc_trim  # noqa: B018
    except AttributeError:
        pytest.skip("no malloc_trim here (not glibc): release_free_memory does nothing")
    blocks = [bytes(1024) + bytes([n % 256]) for n in range(80_000)]
    keep = bytes(1024) + b"top"
    before = resident_mib()
    del blocks
    after_free = resident_mib()
    release_free_memory()
    after_release = resident_mib()
    assert keep
    assert after_free > before - 20  # freed, but still resident
    assert after_release < after_free - 40  # ~80 MiB of 1 KiB blocks given back
