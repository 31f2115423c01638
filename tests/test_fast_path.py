"""The fast read path answers exactly as KeyHandler does, and steps aside when it must."""

from __future__ import annotations

import gzip
import json
from urllib.parse import quote

import pytest

KEYS = {"plain": 1, "a/b c": {"x": [1, None]}, "ключ": "значение", "big": 2**70}
REQUESTS = [
    ("/keys/plain", {}),
    ("/keys/" + quote("a/b c", safe=""), {}),
    ("/keys/a/b%20c", {}),
    ("/keys/" + quote("ключ"), {}),
    ("/keys/big", {}),
    ("/keys/absent", {}),
    ("/keys/%ff", {}),
    ("/keys/%01", {}),
    ("/keys/plain", {"If-None-Match": '"1"'}),
    ("/keys/plain", {"If-None-Match": '"9", W/"1"'}),
    ("/keys/plain", {"If-None-Match": '"9"'}),
    ("/keys/plain?at=1", {}),
    # If-Match (RFC 9110 section 13.1.1): KeyHandler's, on every path
    ("/keys/plain", {"If-Match": '"1"'}),
    ("/keys/plain", {"If-Match": "*"}),
    ("/keys/plain", {"If-Match": '"999"'}),
    ("/keys/plain", {"If-Match": 'W/"1"'}),  # strong comparison: a weak tag never matches
    ("/keys/absent", {"If-Match": "*"}),
    ("/keys/plain", {"If-Match": '"999"', "If-None-Match": '"1"'}),  # If-Match first: 412, not 304
]
COMPARED_HEADERS = ("Content-Type", "ETag", "Cache-Control", "Content-Length", "Allow")


async def answered(http_client, url, method, requests):  # noqa: ANN001, ANN201
    """(path, status, body, compared headers) for each (path, body, headers) request."""
    found = []
    for path, body, headers in requests:
        response = await http_client.fetch(url + path, method=method, body=body, headers=headers,
                                           raise_error=False)
        found.append((path, response.code, response.body,
                      {name: response.headers.get(name) for name in COMPARED_HEADERS}))
    return found


async def answers(http_client, base_url, method="GET"):  # noqa: ANN001, ANN201
    return await answered(http_client, base_url, method, [(path, None, headers) for path, headers in REQUESTS])


@pytest.mark.gen_test
async def test_fast_path_answers_exactly_like_the_handler(http_client, base_url, app, harness):
    await http_client.fetch(base_url + "/keys", method="PUT", body=json.dumps(KEYS),
                            headers={"Content-Type": "application/json"})
    app.fast_paths = False
    slow = await answers(http_client, base_url)
    app.fast_paths = True
    fast = await answers(http_client, base_url)
    assert fast == slow
    assert [code for _, code, _, _ in fast] == [200, 200, 200, 200, 200, 404, 400, 400, 304, 304,
                                                200, 200,  # ?at=1: KeyHandler reads seq 1
                                                200, 200, 412, 412, 412, 412]


@pytest.mark.gen_test
async def test_head_on_the_wire_answers_exactly_like_the_handler(http_client, tmp_path, served):
    """Each fetch is a new connection whose first request is the HEAD: kvd's own
    connection answers it with the fast paths on, KeyHandler with them off."""
    from conftest import build_harness

    slow_harness, fast_harness = build_harness(tmp_path / "slow"), build_harness(tmp_path / "fast")
    found = []
    for harness, fast_paths in ((slow_harness, False), (fast_harness, True)):
        url = served(harness, fast_paths=fast_paths)
        await http_client.fetch(url + "/keys", method="PUT", body=json.dumps(KEYS),
                                headers={"Content-Type": "application/json"})
        found.append(await answers(http_client, url, method="HEAD"))
    slow, fast = found
    assert fast == slow
    assert [code for _, code, _, _ in fast] == [200, 200, 200, 200, 200, 404, 400, 400, 304, 304,
                                                200, 200, 200, 200, 412, 412, 412, 412]
    assert all(body == b"" for _, _, body, _ in fast)
    gets = await answers(http_client, url)  # GET on the same store: the same lengths
    assert [headers["Content-Length"] for *_, headers in fast] == [
        headers["Content-Length"] for *_, headers in gets]


@pytest.mark.gen_test
async def test_fast_path_reads_are_counted_in_metrics(http_client, base_url, app, harness):
    await http_client.fetch(base_url + "/keys/k", method="PUT", body=b"1",
                            headers={"Content-Type": "application/json"})
    for _ in range(3):
        await http_client.fetch(base_url + "/keys/k")
    metrics = (await http_client.fetch(base_url + "/metrics")).body.decode()
    assert 'request_count_total{endpoint="/keys/{id}",method="GET",status="200"} 3.0' in metrics


@pytest.mark.gen_test
async def test_wire_deletes_are_counted_in_metrics(http_client, base_url, app, harness):
    await http_client.fetch(base_url + "/keys/k", method="PUT", body=b"1",
                            headers={"Content-Type": "application/json"})
    for _ in range(2):
        await http_client.fetch(base_url + "/keys/k", method="DELETE", raise_error=False)
    metrics = (await http_client.fetch(base_url + "/metrics")).body.decode()
    assert 'request_count_total{endpoint="/keys/{id}",method="DELETE",status="204"} 1.0' in metrics
    assert 'request_count_total{endpoint="/keys/{id}",method="DELETE",status="404"} 1.0' in metrics


@pytest.mark.gen_test
async def test_fast_path_steps_aside_while_replaying(http_client, base_url, app, harness):
    harness.store.ready = False
    response = await http_client.fetch(base_url + "/keys/k", raise_error=False)
    assert response.code == 503


JSON_TYPE = {"Content-Type": "application/json"}
WRITES = [
    ("/keys/a", b"1", JSON_TYPE),
    ("/keys/a", b'{"x": [1, null]}', JSON_TYPE),
    ("/keys/" + quote("a/b c", safe=""), b'"v"', JSON_TYPE),
    ("/keys/c", b"2", {"Content-Type": "application/json; charset=utf-8"}),
    ("/keys/big-int", b"123456789012345678901234567890", JSON_TYPE),
    ("/keys/bad", b"{", JSON_TYPE),
    ("/keys/nan", b"NaN", JSON_TYPE),
    ("/keys/empty", b"", JSON_TYPE),
    ("/keys/%ff", b"1", JSON_TYPE),
    ("/keys/%01", b"1", JSON_TYPE),
    ("/keys/huge", b'"' + b"x" * (1 << 20) + b'"', JSON_TYPE),
    ("/keys/deep", b"[" * 200 + b"]" * 200, JSON_TYPE),
    ("/keys/text", b"1", {"Content-Type": "text/plain"}),
    ("/keys/a", b"3", {**JSON_TYPE, "If-Match": '"1"'}),
    ("/keys/new", b"4", {**JSON_TYPE, "If-None-Match": "*"}),
    # Content-Encoding: kvd decompresses nothing, so only identity is taken
    ("/keys/gz", gzip.compress(b"5"), {**JSON_TYPE, "Content-Encoding": "gzip"}),
    ("/keys/gz", b"5", {**JSON_TYPE, "Content-Encoding": "gzip"}),  # says gzip, is not
    ("/keys/gz", b"5", {**JSON_TYPE, "Content-Encoding": "identity, br"}),
    ("/keys/id", b"6", {**JSON_TYPE, "Content-Encoding": "identity"}),
]


async def write_answers(http_client, url):  # noqa: ANN001, ANN201
    return await answered(http_client, url, "PUT", WRITES)


def journal_changes(harness):  # noqa: ANN001, ANN201
    return [{k: v for k, v in line.items() if k not in ("ts", "prev", "hash")}
            for line in harness.journal_lines()]


@pytest.mark.gen_test
async def test_fast_write_path_answers_and_journals_exactly_like_the_handler(
        http_client, tmp_path, served):
    from conftest import build_harness

    slow_harness, fast_harness = build_harness(tmp_path / "slow"), build_harness(tmp_path / "fast")
    slow_url = served(slow_harness, fast_paths=False)
    fast_url = served(fast_harness)
    slow = await write_answers(http_client, slow_url)
    fast = await write_answers(http_client, fast_url)
    assert fast == slow
    assert [code for _, code, _, _ in fast] == [201, 200, 201, 201, 201, 400, 400, 400, 400, 400,
                                                413, 400, 415, 412, 201, 415, 415, 415, 201]
    assert journal_changes(fast_harness) == journal_changes(slow_harness)


DELETES = [
    ("/keys/a", {}),  # present: 204
    ("/keys/a", {}),  # gone: 404
    ("/keys/" + quote("a/b c", safe=""), {}),
    ("/keys/%ff", {}),  # not UTF-8: 400
    ("/keys/c", {"If-Match": '"1"'}),  # KeyHandler's, on both
    ("/keys/c", {"If-None-Match": "*"}),
]


async def delete_answers(http_client, url):  # noqa: ANN001, ANN201
    for path, body, headers in WRITES[:4]:
        await http_client.fetch(url + path, method="PUT", body=body, headers=headers)
    return await answered(http_client, url, "DELETE", [(path, None, headers) for path, headers in DELETES])


@pytest.mark.gen_test
async def test_plain_deletes_answer_and_journal_exactly_like_the_handler(http_client, tmp_path, served):
    from conftest import build_harness

    slow_harness, fast_harness = build_harness(tmp_path / "slow"), build_harness(tmp_path / "fast")
    slow = await delete_answers(http_client, served(slow_harness, fast_paths=False))
    fast = await delete_answers(http_client, served(fast_harness))
    assert fast == slow
    assert [code for _, code, _, _ in fast] == [204, 404, 204, 400, 412, 412]
    assert journal_changes(fast_harness) == journal_changes(slow_harness)
    assert fast_harness.ctx.in_flight == 0


@pytest.mark.gen_test
async def test_fast_write_path_answers_503_when_the_journal_refuses(http_client, base_url, app,
                                                                    harness, monkeypatch):
    from kvd.log import file as file_journal

    def failing_fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(file_journal.os, "fdatasync", failing_fdatasync)
    response = await http_client.fetch(base_url + "/keys/k", method="PUT", body=b"1",
                                       headers={"Content-Type": "application/json"},
                                       raise_error=False)
    assert response.code == 503
    assert json.loads(response.body)["error"]["code"] == "unavailable"
    assert "Retry-After" not in response.headers  # a failed fsync needs a restart
    assert harness.ctx.in_flight == 0


@pytest.mark.gen_test
async def test_concurrent_fast_writes_of_one_key_are_decided_in_journal_order(
        http_client, base_url, app, harness):
    """The fast PUT decides 201 vs 200 and answers from the journal's callback: of many
    concurrent writes of a new key exactly one creates it, each answer's ETag is its own
    record, and the value left is the one with the highest ETag."""
    import asyncio

    responses = await asyncio.gather(*[
        http_client.fetch(base_url + "/keys/race", method="PUT", body=json.dumps(n).encode(),
                          headers={"Content-Type": "application/json"})
        for n in range(24)
    ])
    codes = sorted(response.code for response in responses)
    assert codes == [200] * 23 + [201]
    etags = {int(response.headers["ETag"].strip('"')): json.loads(response.body)["race"]
             for response in responses}
    assert len(etags) == 24
    stored = await http_client.fetch(base_url + "/keys/race")
    assert stored.headers["ETag"] == f'"{max(etags)}"'
    assert json.loads(stored.body)["race"] == etags[max(etags)]
    assert harness.ctx.in_flight == 0


@pytest.mark.gen_test
async def test_a_fast_write_the_disk_refuses_gets_503_and_the_next_one_succeeds(
        http_client, base_url, app, harness, monkeypatch):
    import errno

    from kvd.log import file as file_journal

    real_write = file_journal.os.write

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_journal.os, "write", disk_full)
    put = {"method": "PUT", "body": b'"v"', "headers": {"Content-Type": "application/json"},
           "raise_error": False}
    refused = await http_client.fetch(base_url + "/keys/k", **put)
    assert refused.code == 503 and refused.headers.get("Retry-After") == "1"
    assert json.loads(refused.body)["error"]["code"] == "unavailable"
    assert harness.ctx.in_flight == 0
    assert (await http_client.fetch(base_url + "/keys/k", raise_error=False)).code == 404
    monkeypatch.setattr(file_journal.os, "write", real_write)
    accepted = await http_client.fetch(base_url + "/keys/k", **put)
    assert accepted.code == 201
    assert [line["set"] for line in harness.journal_lines() if line["op"] == "put"] == [{"k": "v"}]
