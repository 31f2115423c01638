"""PUT/PATCH /keys/{id}, conditional requests (RFC 9110) and pagination."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any
from urllib.parse import quote

import pytest
from tests_support import FakeClock


def error(response: Any) -> str:
    return json.loads(response.body)["error"]["code"]


# --- PUT /keys/{id} --------------------------------------------------------------


@pytest.mark.gen_test
async def test_put_one_key_creates_then_replaces(api, harness):
    created = await api("PUT", "/keys/k", {"a": [1, 2]})
    assert created.code == 201
    assert json.loads(created.body) == {"k": {"a": [1, 2]}}
    assert created.headers["ETag"] == '"1"'
    replaced = await api("PUT", "/keys/k", "text")
    assert replaced.code == 200 and replaced.headers["ETag"] == '"2"'
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": "text"}


@pytest.mark.gen_test
@pytest.mark.parametrize("value", [None, 0, "", [], {}, 1.5, True, "ünï"])
async def test_put_one_key_stores_any_json_value(api, value):
    assert (await api("PUT", "/keys/k", raw=json.dumps(value).encode())).code == 201
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": value}


@pytest.mark.gen_test
async def test_put_one_key_with_a_slash_in_the_key(api):
    assert (await api("PUT", "/keys/" + quote("a/b c", safe=""), 1)).code == 201
    assert json.loads((await api("GET", "/keys")).body) == {"a/b c": 1}


@pytest.mark.gen_test
@pytest.mark.parametrize("raw", [b"", b"{", b"NaN", b"[1,]", b"\xff"])
async def test_put_one_key_bad_body_is_400_and_writes_nothing(api, harness, raw):
    response = await api("PUT", "/keys/k", raw=raw)
    assert response.code == 400 and error(response) == "bad_request"
    assert harness.journal_lines() == []


@pytest.mark.gen_test
async def test_put_one_key_without_expire_in_removes_expiry(api, harness):
    clock = FakeClock()
    harness.store.clock = clock
    await api("PUT", "/keys/k?expire_in=5", 1)
    await api("PUT", "/keys/k", 2)
    clock.now += 10
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": 2}


# --- conditional writes ------------------------------------------------------------


@pytest.mark.gen_test
async def test_if_none_match_star_creates_only_when_absent(api, harness):
    assert (await api("PUT", "/keys/k", 1, headers={"If-None-Match": "*"})).code == 201
    again = await api("PUT", "/keys/k", 2, headers={"If-None-Match": "*"})
    assert again.code == 412 and error(again) == "precondition_failed"
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": 1}
    assert len(harness.journal_lines()) == 1


@pytest.mark.gen_test
async def test_if_match_current_etag_writes_and_stale_etag_is_412(api, harness):
    first = await api("PUT", "/keys/k", 1)
    tag = first.headers["ETag"]
    ok = await api("PUT", "/keys/k", 2, headers={"If-Match": tag})
    assert ok.code == 200
    stale = await api("PUT", "/keys/k", 3, headers={"If-Match": tag})
    assert stale.code == 412 and error(stale) == "precondition_failed"
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": 2}
    assert len(harness.journal_lines()) == 2


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_if_match_on_an_absent_key_is_412(api, harness, method):
    response = await api(method, "/keys/ghost", None if method == "DELETE" else {"a": 1},
                         headers={"If-Match": '"1"'})
    assert response.code == 412
    assert harness.journal_lines() == []


@pytest.mark.gen_test
async def test_if_match_star_needs_the_key_to_exist(api):
    assert (await api("PUT", "/keys/k", 1, headers={"If-Match": "*"})).code == 412
    await api("PUT", "/keys/k", 1)
    assert (await api("PUT", "/keys/k", 2, headers={"If-Match": "*"})).code == 200


@pytest.mark.gen_test
async def test_delete_with_if_match(api):
    tag = (await api("PUT", "/keys/k", 1)).headers["ETag"]
    assert (await api("DELETE", "/keys/k", headers={"If-Match": '"99"'})).code == 412
    assert (await api("DELETE", "/keys/k", headers={"If-Match": tag})).code == 204
    assert (await api("GET", "/keys/k")).code == 404


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
async def test_if_none_match_star_on_an_existing_key_is_412_for_every_write(api, harness, method):
    """RFC 9110 section 13.1.2: the condition is false when the key exists, so the write must
    not happen; before, PATCH and DELETE ignored the header and wrote."""
    await api("PUT", "/keys/k", {"a": 1})
    response = await api(method, "/keys/k", None if method == "DELETE" else {"b": 2},
                         headers={"If-None-Match": "*"})
    assert response.code == 412 and error(response) == "precondition_failed"
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": {"a": 1}}
    assert len(harness.journal_lines()) == 1
    absent = await api(method, "/keys/ghost", None if method == "DELETE" else {"b": 2},
                       headers={"If-None-Match": "*"})
    assert absent.code == 404  # the condition holds; the key is still not there to change
    tagged = await api(method, "/keys/k", None if method == "DELETE" else {"b": 2},
                       headers={"If-None-Match": '"1"'})
    assert tagged.code == 400 and error(tagged) == "bad_request"  # as on PUT: only '*'
    assert len(harness.journal_lines()) == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize(("header", "value", "status"), [
    ("If-Match", '"1"', 412),  # the collection has no ETag, so no tag matches
    ("If-Match", 'W/"1", "2"', 412),
    ("If-None-Match", "*", 412),  # the collection always exists
    ("If-None-Match", '"1"', 400),  # as on every write: only '*'
])
async def test_a_precondition_on_the_whole_collection_is_never_ignored(
    api, harness, method, header, value, status
):
    """Before, PUT and DELETE /keys ignored both headers: DELETE /keys with a stale
    If-Match cleared every key."""
    await api("PUT", "/keys/k", 1)
    response = await api(method, "/keys", {"k": 2} if method == "PUT" else None, headers={header: value})
    assert response.code == status, response.body
    assert error(response) == ("precondition_failed" if status == 412 else "bad_request")
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": 1}
    assert len(harness.journal_lines()) == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_if_match_star_on_the_collection_holds(api, harness, method):
    await api("PUT", "/keys/k", 1)
    response = await api(method, "/keys", {"k": 2} if method == "PUT" else None, headers={"If-Match": "*"})
    assert response.code == (200 if method == "PUT" else 204)
    assert len(harness.journal_lines()) == 2


@pytest.mark.gen_test
async def test_racing_compare_and_set_has_exactly_one_winner(api, harness):
    tag = (await api("PUT", "/keys/counter", 0)).headers["ETag"]
    responses = await asyncio.gather(*(
        api("PUT", "/keys/counter", n, headers={"If-Match": tag}) for n in range(1, 21)
    ))
    codes = sorted(response.code for response in responses)
    assert codes == [200] + [412] * 19
    winner = next(r for r in responses if r.code == 200)
    assert json.loads((await api("GET", "/keys/counter")).body) == json.loads(winner.body)
    assert len(harness.journal_lines()) == 2


@pytest.mark.slow
def test_racing_compare_and_set_across_connections_has_exactly_one_winner(kvd_process):
    server = kvd_process()
    tag = server.request("PUT", "/keys/c", 0).headers["ETag"]
    results: list[int] = []
    start = threading.Barrier(16)

    def racer(n: int) -> None:
        start.wait()
        results.append(server.request("PUT", "/keys/c", n, headers={"If-Match": tag}).status)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [200] + [412] * 15
    assert server.request("GET", "/readyz").json()["revision"] == 2


# --- PATCH ----------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_patch_merges_per_rfc_7396(api):
    await api("PUT", "/keys/doc", {"a": "b", "c": {"d": "e", "f": "g"}, "keep": [1]})
    response = await api("PATCH", "/keys/doc", {"a": "z", "c": {"f": None}, "new": {"x": 1}},
                         headers={"Content-Type": "application/merge-patch+json"})
    assert response.code == 200
    expected = {"a": "z", "c": {"d": "e"}, "keep": [1], "new": {"x": 1}}
    assert json.loads(response.body) == {"doc": expected}
    assert response.headers["ETag"] == '"2"'
    assert json.loads((await api("GET", "/keys/doc")).body) == {"doc": expected}


@pytest.mark.gen_test
async def test_patch_with_a_non_object_replaces_the_value(api):
    await api("PUT", "/keys/doc", {"a": 1})
    assert json.loads((await api("PATCH", "/keys/doc", [1, 2])).body) == {"doc": [1, 2]}


@pytest.mark.gen_test
async def test_patch_of_an_absent_key_is_404(api, harness):
    response = await api("PATCH", "/keys/ghost", {"a": 1})
    assert response.code == 404 and error(response) == "not_found"
    assert harness.journal_lines() == []


@pytest.mark.gen_test
async def test_patch_keeps_the_expiry(api, harness):
    clock = FakeClock()
    harness.store.clock = clock
    await api("PUT", "/keys/k?expire_in=10", {"a": 1})
    clock.now += 5
    await api("PATCH", "/keys/k", {"b": 2})
    assert harness.journal_lines()[-1]["expires"] == harness.journal_lines()[0]["expires"]
    clock.now += 6
    assert (await api("GET", "/keys/k")).code == 404


@pytest.mark.gen_test
async def test_patch_with_wrong_content_type_is_415(api, harness):
    await api("PUT", "/keys/k", {"a": 1})
    response = await api("PATCH", "/keys/k", raw=b'{"a":2}', headers={"Content-Type": "text/plain"})
    assert response.code == 415
    assert len(harness.journal_lines()) == 1


@pytest.mark.gen_test
async def test_patch_that_grows_past_the_value_limit_is_413(api, harness):
    limit = harness.ctx.config.server.max_value_bytes
    await api("PUT", "/keys/k", {"a": "x" * (limit // 2)})
    response = await api("PATCH", "/keys/k", {"b": "y" * (limit // 2)})
    assert response.code == 413
    assert len(harness.journal_lines()) == 1


# --- pagination --------------------------------------------------------------------------


def next_link(response: Any) -> str | None:
    link = response.headers.get("Link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert match, link
    return match.group(1)


async def walk(api: Any, path: str, mutate: Any = None) -> list[str]:
    seen: list[str] = []
    while path is not None:
        response = await api("GET", path)
        assert response.code == 200
        seen += list(json.loads(response.body))
        if mutate is not None:
            await mutate(len(seen))
        path = next_link(response)
    return seen


@pytest.mark.gen_test
async def test_pages_walk_every_key_once_in_order(api):
    keys = [f"k{i:02d}" for i in range(10)]
    await api("PUT", "/keys", dict.fromkeys(keys, 1))
    assert await walk(api, "/keys?limit=3") == keys
    last = await api("GET", "/keys?limit=10")
    assert next_link(last) is None  # nothing remains: no Link


@pytest.mark.gen_test
async def test_pages_combine_with_filter(api):
    await api("PUT", "/keys", dict.fromkeys(["a1", "a2", "b1", "a3", "a4", "c"], 0))
    assert await walk(api, "/keys?limit=2&filter=a*") == ["a1", "a2", "a3", "a4"]


@pytest.mark.gen_test
async def test_keys_that_exist_throughout_a_walk_appear_exactly_once(api):
    stable = [f"s{i:03d}" for i in range(0, 100, 2)]
    await api("PUT", "/keys", dict.fromkeys(stable, 1))

    async def churn(seen: int) -> None:
        await api("PUT", "/keys", {f"s{seen:03d}x": 1, f"s{99 - seen:03d}y": 1, "a": 1})
        await api("DELETE", "/keys/a")

    seen = await walk(api, "/keys?limit=7", mutate=churn)
    assert [key for key in seen if key in stable] == stable
    assert len(seen) == len(set(seen))


@pytest.mark.gen_test
@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "limit=abc", "limit=-1", "limit=1.5",
                                   "cursor=%%%", "cursor=Zm9v", "limit=2&cursor="])
async def test_bad_limit_or_cursor_is_400(api, query):
    response = await api("GET", "/keys?" + query)
    assert response.code == 400 and error(response) == "bad_request"


@pytest.mark.gen_test
async def test_if_match_uses_strong_comparison(api, harness):
    await api("PUT", "/keys/k", 1)
    weak = await api("PUT", "/keys/k", 2, headers={"If-Match": 'W/"1"'})
    assert weak.code == 412
    assert (await api("PUT", "/keys/k", 2, headers={"If-Match": '"7", "1"'})).code == 200


@pytest.mark.gen_test
async def test_patch_refuses_expire_in(api, harness):
    await api("PUT", "/keys/k", {"a": 1})
    response = await api("PATCH", "/keys/k?expire_in=5", {"b": 2})
    assert response.code == 400 and error(response) == "bad_request"
    assert len(harness.journal_lines()) == 1
