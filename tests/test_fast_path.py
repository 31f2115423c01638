"""The fast read path answers exactly as KeyHandler does, and steps aside when it must."""

from __future__ import annotations

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
]
COMPARED_HEADERS = ("Content-Type", "ETag", "Cache-Control", "Content-Length", "Allow")


async def answers(http_client, base_url):  # noqa: ANN001, ANN201
    found = []
    for path, headers in REQUESTS:
        response = await http_client.fetch(base_url + path, headers=headers, raise_error=False)
        found.append((path, response.code, response.body,
                      {name: response.headers.get(name) for name in COMPARED_HEADERS}))
    return found


@pytest.mark.gen_test
async def test_fast_path_answers_exactly_like_the_handler(http_client, base_url, app, harness):
    await http_client.fetch(base_url + "/keys", method="PUT", body=json.dumps(KEYS),
                            headers={"Content-Type": "application/json"})
    app.fast_reads = False
    slow = await answers(http_client, base_url)
    app.fast_reads = True
    fast = await answers(http_client, base_url)
    assert fast == slow
    assert [code for _, code, _, _ in fast] == [200, 200, 200, 200, 200, 404, 400, 400, 304, 304,
                                                200, 400]


@pytest.mark.gen_test
async def test_fast_path_reads_are_counted_in_metrics(http_client, base_url, app, harness):
    await http_client.fetch(base_url + "/keys/k", method="PUT", body=b"1",
                            headers={"Content-Type": "application/json"})
    for _ in range(3):
        await http_client.fetch(base_url + "/keys/k")
    metrics = (await http_client.fetch(base_url + "/metrics")).body.decode()
    assert 'request_count_total{endpoint="/keys/{id}",method="GET",status="200"} 3.0' in metrics


@pytest.mark.gen_test
async def test_fast_path_steps_aside_while_replaying(http_client, base_url, app, harness):
    harness.store.ready = False
    response = await http_client.fetch(base_url + "/keys/k", raise_error=False)
    assert response.code == 503
