"""``?at=X`` reads: the state at a seq or an ISO 8601 time, against a model kept by the test."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any
from urllib.parse import quote

import pytest
from conftest import build_harness

from kvd.log.format import format_ts, parse_ts
from kvd.log.history import History

KEYS = ("a", "b", "user/1", "user/2", "with space", "ключ", "zz")


@pytest.fixture
def plugin_settings() -> dict[str, Any]:
    # No background sweep: expiry is judged by the moment asked about, not by expire records.
    return {"journal.fsync": "no", "journal.segment_bytes": 4096,
            "plugins.expiry": {"sweep_interval": 60}}


Model = dict[str, tuple[Any, int]]  # key -> (value, revision)


def path(key: str) -> str:
    return "/keys/" + quote(key, safe="")


def values(model: Model) -> dict[str, Any]:
    return {key: value for key, (value, _) in sorted(model.items())}


async def random_history(api, operations: int, seed: int = 7) -> dict[int, Model]:  # noqa: ANN001
    """Random writes through the API; returns the model after every seq (0: empty)."""
    rng = random.Random(seed)
    model: Model = {}
    states: dict[int, Model] = {0: {}}
    for _ in range(operations):
        choice = rng.random()
        key = rng.choice(KEYS)
        if choice < 0.35:
            value = {"n": rng.randint(0, 99), "tags": [rng.random()]}
            response = await api("PUT", path(key), value)
            seq = int(response.headers["ETag"].strip('"'))
            model[key] = (value, seq)
        elif choice < 0.6:
            batch = {k: rng.randint(0, 9) for k in rng.sample(KEYS, 3)}
            response = await api("PUT", "/keys?expire_in=3600", batch)
            seq = json.loads(response.body)["revision"]
            model.update({k: (v, seq) for k, v in batch.items()})
        elif choice < 0.75 and key in model:
            patch = {"patched": True}
            response = await api("PATCH", path(key), patch)
            seq = int(response.headers["ETag"].strip('"'))
            old = model[key][0]
            model[key] = ({**old, **patch} if isinstance(old, dict) else patch, seq)
        elif choice < 0.93 and key in model:
            response = await api("DELETE", path(key))
            assert response.code == 204
            seq = max(states) + 1
            del model[key]
        elif choice >= 0.93:
            assert (await api("DELETE", "/keys")).code == 204
            seq = max(states) + 1
            model.clear()
        else:
            continue
        assert seq == max(states) + 1
        states[seq] = dict(model)
    return states


async def listing(api, query: str) -> dict[str, Any]:  # noqa: ANN001
    response = await api("GET", "/keys?" + query)
    assert response.code == 200, response.body
    return json.loads(response.body)


@pytest.mark.gen_test(timeout=60)
async def test_at_seq_answers_the_state_after_that_record_for_every_seq(api, harness):
    states = await random_history(api, 80)
    head = max(states)
    assert head > 50 and harness.journal.last_seq == head
    before = len(harness.journal_lines())
    for seq, model in states.items():
        assert await listing(api, f"at={seq}") == values(model), f"at={seq}"
        for key in KEYS:
            response = await api("GET", path(key) + f"?at={seq}")
            if key in model:
                value, revision = model[key]
                assert response.code == 200
                assert json.loads(response.body) == {key: value}
                assert response.headers["ETag"] == f'"{revision}"'
            else:
                assert response.code == 404, (seq, key)
    assert len(harness.journal_lines()) == before  # reads wrote nothing
    assert await listing(api, "") == values(states[head])  # the present is untouched


@pytest.mark.gen_test(timeout=60)
async def test_at_time_answers_the_state_of_the_last_record_written_by_then(api, harness):
    states = await random_history(api, 40, seed=11)
    stamps = {line["seq"]: line["ts"] for line in harness.journal_lines()}
    checked = 0
    for seq in sorted(stamps):
        moment = parse_ts(stamps[seq])
        assert await listing(api, "at=" + quote(stamps[seq])) == values(states[seq])
        just_before = format_ts(moment - 0.000001)
        if seq > 1 and just_before > stamps[seq - 1]:
            assert await listing(api, "at=" + quote(just_before)) == values(states[seq - 1])
            checked += 1
    assert checked > 30
    # Other spellings of a time: an offset, no fraction, lower case.
    last = max(stamps)
    moment = parse_ts(stamps[last]) + 1
    for spelling in (format_ts(moment), format_ts(moment).lower(),
                     format_ts(moment).replace("Z", "+00:00"), format_ts(moment)[:19]):
        if parse_ts(spelling.upper()) >= parse_ts(stamps[last]):
            assert await listing(api, "at=" + quote(spelling)) == values(states[last]), spelling


@pytest.mark.gen_test
async def test_a_time_before_the_first_record_is_the_empty_store_and_a_future_time_the_present(api):
    await api("PUT", "/keys", {"a": 1})
    await api("PUT", "/keys", {"b": 2})
    assert await listing(api, "at=2000-01-01T00:00:00Z") == {}
    assert await listing(api, "at=0001-01-01T00:00:00%2B14:00") == {}
    assert await listing(api, "at=9999-12-31T23:59:59Z") == {"a": 1, "b": 2}
    assert await listing(api, "at=0") == {}


@pytest.mark.gen_test
async def test_a_seq_beyond_the_newest_revision_is_a_400(api, harness):
    await api("PUT", "/keys", {"a": 1})
    for at in ("2", "99999999999999999999999"):
        for target in ("/keys", "/keys/a"):
            response = await api("GET", f"{target}?at={at}")
            assert response.code == 400
            assert "beyond the newest revision, 1" in json.loads(response.body)["error"]["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("at", ["-1", "1.5", "yesterday", "%D9%A1", "", "2026-13-01", "1e3", "%FF"])
async def test_a_malformed_at_is_a_400(api, at):
    await api("PUT", "/keys", {"a": 1})
    for target in ("/keys", "/keys/a"):
        response = await api("GET", f"{target}?at={at}")
        assert response.code == 400, (target, at, response.body)
        assert json.loads(response.body)["error"]["code"] == "bad_request"


@pytest.mark.gen_test
@pytest.mark.parametrize("method, target, body", [
    ("PUT", "/keys/a", 2), ("PATCH", "/keys/a", {"x": 1}), ("DELETE", "/keys/a", None),
    ("PUT", "/keys", {"a": 2}), ("DELETE", "/keys", None),
])
async def test_at_on_a_write_is_a_400_and_writes_nothing(api, harness, method, target, body):
    await api("PUT", "/keys", {"a": {"v": 1}})
    response = await api(method, f"{target}?at=1", body)
    assert response.code == 400
    assert "?at=" in json.loads(response.body)["error"]["message"]
    assert len(harness.journal_lines()) == 1
    assert await listing(api, "") == {"a": {"v": 1}}


@pytest.mark.gen_test(timeout=20)
async def test_keys_expired_at_that_moment_are_absent(api, harness):
    await api("PUT", "/keys/temp?expire_in=0.3", "soon")  # seq 1
    await api("PUT", "/keys/keep", 1)  # seq 2, at once
    await asyncio.sleep(0.5)
    await api("PUT", "/keys/late", 2)  # seq 3, after temp's expiry; no sweep journaled it
    lines = harness.journal_lines()
    assert [line["op"] for line in lines] == ["put", "put", "put"]
    expires_at = lines[0]["expires"]["temp"]

    assert await listing(api, "at=2") == {"keep": 1, "temp": "soon"}
    assert await listing(api, "at=3") == {"keep": 1, "late": 2}
    assert (await api("GET", "/keys/temp?at=2")).code == 200
    assert (await api("GET", "/keys/temp?at=3")).code == 404
    assert (await api("HEAD", "/keys/temp?at=3")).code == 404
    # By time: present just before its expiry instant, absent from that instant on.
    before = format_ts(parse_ts(expires_at) - 0.001)
    assert (await api("GET", "/keys/temp?at=" + quote(before))).code == 200
    assert (await api("GET", "/keys/temp?at=" + quote(expires_at))).code == 404
    assert await listing(api, "at=" + quote(expires_at)) == {"keep": 1}


@pytest.mark.gen_test
async def test_at_etag_is_the_revision_then_and_if_none_match_and_head_agree(api):
    await api("PUT", "/keys/k", {"v": 1})  # 1
    await api("PUT", "/keys/other", 0)  # 2
    await api("PUT", "/keys/k", {"v": 2})  # 3
    get = await api("GET", "/keys/k?at=2")
    assert get.headers["ETag"] == '"1"' and json.loads(get.body) == {"k": {"v": 1}}
    head = await api("HEAD", "/keys/k?at=2")
    assert head.code == 200 and head.headers["ETag"] == '"1"'
    assert int(head.headers["Content-Length"]) == len(get.body)
    assert (await api("GET", "/keys/k?at=2", headers={"If-None-Match": '"1"'})).code == 304
    assert (await api("GET", "/keys/k?at=3", headers={"If-None-Match": '"1"'})).code == 200
    assert (await api("GET", "/keys/k")).headers["ETag"] == '"3"'


@pytest.mark.gen_test(timeout=30)
async def test_past_listing_pages_with_filter_limit_and_cursor_walk_that_state(api, harness):
    await api("PUT", "/keys", {f"user/{n:03d}": n for n in range(57)} | {"zone": 1})
    seq = harness.journal.last_seq
    await api("DELETE", "/keys")
    await api("PUT", "/keys", {"user/new": 0})
    walked: dict[str, Any] = {}
    next_url = f"/keys?filter=user/*&limit=10&at={seq}"
    pages = 0
    while next_url:
        response = await api("GET", next_url)
        assert response.code == 200
        page = json.loads(response.body)
        assert not set(page) & set(walked) and list(page) == sorted(page)
        walked.update(page)
        pages += 1
        link = response.headers.get("Link")
        next_url = re.match(r"<([^>]+)>", link).group(1) if link else None
        if next_url:
            assert f"at={seq}" in next_url and "filter=" in next_url
    assert pages == 6
    assert walked == {f"user/{n:03d}": n for n in range(57)}


@pytest.mark.gen_test(timeout=30)
async def test_at_before_the_oldest_snapshot_is_a_410_when_history_was_not_archived(api, harness):
    states = await random_history(api, 120, seed=3)
    report = await harness.ctx.compactor.compact()
    assert report.segments_retired > 0
    oldest = History(harness.data_dir).oldest_point()
    assert oldest == report.seq

    for at in ("0", "1", str(oldest - 1)):
        for target in ("/keys", "/keys/a"):
            response = await api("GET", f"{target}?at={at}")
            assert response.code == 410, (target, at)
            error = json.loads(response.body)["error"]
            assert error["code"] == "gone" and "archive" in error["message"]
    assert (await api("HEAD", "/keys/a?at=0")).code == 410
    snapshot_ts = History(harness.data_dir).snapshot_headers()[0][1].ts
    too_early = format_ts(parse_ts(snapshot_ts) - 0.000001)
    assert (await api("GET", "/keys?at=" + quote(too_early))).code == 410
    # From the snapshot on, the history answers.
    assert await listing(api, f"at={oldest}") == values(states[oldest])
    assert await listing(api, "at=" + quote(snapshot_ts)) == values(states[oldest])
    await api("PUT", "/keys/after", 1)
    assert await listing(api, f"at={oldest + 1}") == values(states[oldest]) | {"after": 1}


@pytest.mark.gen_test(timeout=30)
async def test_with_archive_every_point_since_seq_0_stays_readable(http_client, served, tmp_path):
    harness = build_harness(tmp_path / "archived", **{
        "journal.fsync": "no", "journal.segment_bytes": 4096, "journal.archive": True,
        "plugins.expiry": {"sweep_interval": 60},
    })
    url = served(harness)

    async def api(method: str, target: str, body: Any = None, headers: dict | None = None) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        if payload is None and method in ("PUT", "PATCH"):
            payload = b""
        return await http_client.fetch(
            url + target, method=method, body=payload, raise_error=False,
            headers={"Content-Type": "application/json", **(headers or {})},
        )

    states = await random_history(api, 120, seed=5)
    report = await harness.ctx.compactor.compact()
    assert report.segments_retired > 0 and History(harness.data_dir).oldest_point() == 0
    for seq in (0, 1, report.seq // 2, report.seq - 1, report.seq, max(states)):
        assert await listing(api, f"at={seq}") == values(states[seq]), seq


@pytest.mark.gen_test
async def test_past_reads_run_the_replay_in_a_worker_thread(api, monkeypatch):
    await api("PUT", "/keys", {"a": 1})
    loop = asyncio.get_running_loop()
    calls = []
    original = loop.run_in_executor

    def counting(executor, func, *args):  # noqa: ANN001, ANN202
        calls.append(getattr(getattr(func, "func", func), "__name__", ""))  # unwrap a partial
        return original(executor, func, *args)

    monkeypatch.setattr(loop, "run_in_executor", counting)
    assert (await api("GET", "/keys/a?at=1")).code == 200
    assert await listing(api, "at=1") == {"a": 1}
    assert calls.count("read_past_state") == 2 and "listing" in calls
