"""Start-up as an operator sees it: 503 while replaying, progress, then ready."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from make_journal import make_journal  # noqa: E402


@pytest.mark.slow
def test_keys_and_readyz_answer_503_until_replay_is_done(kvd_process, tmp_path):
    data = tmp_path / "data"
    make_journal(data, records=150_000, keys=50_000)
    server = kvd_process(data_dir=data, wait_ready=False)
    seen_before_ready = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = server.request("GET", "/readyz")
        if ready.status == 200:
            break
        seen_before_ready.add(ready.status)
        keys = server.request("GET", "/keys/key00000001")
        assert keys.status in (503, 200)
        if keys.status == 503:
            assert keys.json()["error"]["code"] == "unavailable"
            assert keys.headers["Retry-After"] == "1"
        assert server.request("GET", "/healthz").status == 200  # alive throughout
    assert seen_before_ready == {503}
    # key00000001 was last written by seq 100001 (seq % 50000 == 1)
    assert server.get_key("key00000001").json()["key00000001"].startswith("value-00100001-")
    assert "ready: 50000 keys at revision 150000" in server.log()


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
