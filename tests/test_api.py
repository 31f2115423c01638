"""The HTTP API against an in-process app (pytest-tornado), per SPEC section 1."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import logging
from urllib.parse import quote

import pytest
from conftest import build_harness
from tornado.httpclient import HTTPResponse

from kvd.model import Change

JSON = {"Content-Type": "application/json"}


def error_code(response: HTTPResponse) -> str:
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.body)["error"]["code"]


# --- reads and writes ---------------------------------------------------------


@pytest.mark.gen_test
async def test_put_batch_then_get_each_key(api, harness):
    response = await api("PUT", "/keys", {"a": 1, "b": {"x": [1, None]}, "c": None})
    assert response.code == 200
    assert json.loads(response.body) == {"revision": 1, "stored": ["a", "b", "c"]}
    for key, value in {"a": 1, "b": {"x": [1, None]}, "c": None}.items():
        got = await api("GET", f"/keys/{key}")
        assert got.code == 200
        assert json.loads(got.body) == {key: value}
        assert got.headers["ETag"] == '"1"'
    assert len(harness.journal_lines()) == 1  # one atomic journal entry for the batch


@pytest.mark.gen_test
async def test_values_read_back_exactly_including_big_integers_and_unicode(api):
    values = {"big": 123456789012345678901234567890, "neg": -(2**70), "f": 0.1,
              "s": "ünï €😀", "esc": "a\"b\\c\n", "empty": {}, "list": []}
    assert (await api("PUT", "/keys", values)).code == 200
    listing = json.loads((await api("GET", "/keys")).body)
    assert listing == values


PRECISE = b'{"pi": 3.14159265358979323846264338327950288, "money": {"amount": 12345678901234567.89}, ' \
    b'"tiny": 1e-400, "near_one": 1.0000000000000000000000001, "ns": 1700000000.123456789}'
PRECISE_STORED = {  # each value's compact text: every digit as sent
    "pi": b"3.14159265358979323846264338327950288", "money": b'{"amount":12345678901234567.89}',
    "tiny": b"1e-400", "near_one": b"1.0000000000000000000000001", "ns": b"1700000000.123456789",
}


@pytest.mark.gen_test
async def test_numbers_keep_every_digit_through_writes_reads_patches_and_replay(api, harness):
    """A double would round these (3.141592653589793, 1.2345678901234568e+16, 0.0, 1.0)."""
    assert (await api("PUT", "/keys", raw=PRECISE)).code == 200
    for key, text in PRECISE_STORED.items():
        assert (await api("GET", f"/keys/{key}")).body == b'{"' + key.encode() + b'":' + text + b"}"
    listing = (await api("GET", "/keys")).body
    assert all(b'"' + key.encode() + b'":' + text in listing for key, text in PRECISE_STORED.items())
    assert (await api("PUT", "/keys/e", raw=b"2.718281828459045235360287471352")).code == 201
    patched = await api("PATCH", "/keys/money", {"currency": "EUR"})
    assert patched.body == b'{"money":{"amount":12345678901234567.89,"currency":"EUR"}}'
    harness.ctx.stop_periodic_tasks()
    await harness.journal.close()
    reopened = build_harness(harness.data_dir)
    try:
        assert reopened.store.get("pi").value == PRECISE_STORED["pi"]
        assert reopened.store.get("e").value == b"2.718281828459045235360287471352"
        assert reopened.store.get("money").value == b'{"amount":12345678901234567.89,"currency":"EUR"}'
    finally:
        reopened.ctx.stop_periodic_tasks()
        reopened.journal.close_sync()


LONGEST_INT = b"9" * 4300  # Python's limit on converting text to int, which kvd keeps


@pytest.mark.gen_test
@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast-paths", "handlers-only"])
@pytest.mark.parametrize("method, path, body", [
    ("PUT", "/keys", b'{"n": %s}'),
    ("PUT", "/keys/n", b"%s"),
    ("PUT", "/keys/n", b'{"deep": [1, {"x": -%s}]}'),
    ("PATCH", "/keys/p", b'{"x": %s}'),
])
async def test_an_integer_over_4300_digits_is_a_clear_400_and_one_of_4300_reads_back(
        api, app, harness, fast_paths, method, path, body):
    """Not Python's own message, which names sys.set_int_max_str_digits()."""
    await api("PUT", "/keys/p", {"x": 1})
    app.fast_paths = fast_paths
    refused = await api(method, path, raw=body % (LONGEST_INT + b"9"))
    assert refused.code == 400 and error_code(refused) == "bad_request"
    assert json.loads(refused.body)["error"]["message"] == (
        "number too long: integers are limited to 4300 digits")
    assert len(harness.journal_lines()) == 1
    accepted = await api(method, path, raw=body % LONGEST_INT)
    assert accepted.code in (200, 201), accepted.body
    key = "n" if method == "PUT" else "p"
    assert LONGEST_INT in (await api("GET", f"/keys/{key}")).body


@pytest.mark.gen_test
async def test_keys_with_slashes_spaces_and_unicode_round_trip(api):
    keys = ["a/b", "with space", "ключ", "?*$\\", "%41"]
    assert (await api("PUT", "/keys", dict.fromkeys(keys, 1))).code == 200
    for key in keys:
        response = await api("GET", "/keys/" + quote(key, safe=""))
        assert response.code == 200, key
        assert json.loads(response.body) == {key: 1}


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "PATCH", "DELETE"])
async def test_an_empty_key_in_the_path_is_a_400_bad_key_not_an_unknown_route(api, harness, method):
    """``"/keys/" + key`` with an empty key: the client's mistake is the key (README: a bad
    key is a 400), which a 404 "no route" would hide."""
    response = await api(method, "/keys/", {"x": 1} if method in ("PUT", "PATCH") else None)
    assert response.code == 400
    if method != "HEAD":
        assert "key must not be empty" in json.loads(response.body)["error"]["message"]
    assert harness.journal_lines() == []


@pytest.mark.gen_test
async def test_get_missing_key_is_404_json(api):
    response = await api("GET", "/keys/nope")
    assert response.code == 404
    assert error_code(response) == "not_found"


@pytest.mark.gen_test
async def test_head_has_etag_and_no_body(api):
    await api("PUT", "/keys", {"k": "v"})
    response = await api("HEAD", "/keys/k")
    assert response.code == 200
    assert response.headers["ETag"] == '"1"'
    assert response.body == b""
    assert (await api("HEAD", "/keys/missing")).code == 404


@pytest.mark.gen_test
async def test_if_none_match_current_etag_gives_304(api):
    await api("PUT", "/keys", {"k": "v"})
    response = await api("GET", "/keys/k", headers={"If-None-Match": '"1"'})
    assert response.code == 304
    assert (await api("GET", "/keys/k", headers={"If-None-Match": '"7"'})).code == 200


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_if_match_on_a_read_is_412_unless_the_key_is_at_that_etag(api, method):
    """RFC 9110 section 13.1.1; ``*`` matches any existing key, never an absent one."""
    await api("PUT", "/keys", {"k": "v"})
    assert (await api(method, "/keys/k", headers={"If-Match": '"1"'})).code == 200
    assert (await api(method, "/keys/k", headers={"If-Match": '"7", "1"'})).code == 200
    assert (await api(method, "/keys/k", headers={"If-Match": "*"})).code == 200
    for key, if_match in (("k", '"999"'), ("absent", "*"), ("absent", '"1"')):
        response = await api(method, f"/keys/{key}", headers={"If-Match": if_match})
        assert response.code == 412, (key, if_match)
        if method == "GET":
            assert error_code(response) == "precondition_failed"


@pytest.mark.gen_test
async def test_overwrite_moves_revision_and_etag(api):
    await api("PUT", "/keys", {"k": 1})
    await api("PUT", "/keys", {"other": 1})
    await api("PUT", "/keys", {"k": 2})
    response = await api("GET", "/keys/k")
    assert json.loads(response.body) == {"k": 2}
    assert response.headers["ETag"] == '"3"'


@pytest.mark.gen_test
async def test_delete_key_then_404_and_journaled(api, harness):
    await api("PUT", "/keys", {"k": 1, "j": 2})
    assert (await api("DELETE", "/keys/k")).code == 204
    assert (await api("GET", "/keys/k")).code == 404
    assert (await api("GET", "/keys/j")).code == 200
    missing = await api("DELETE", "/keys/k")
    assert missing.code == 404 and error_code(missing) == "not_found"
    assert [line["op"] for line in harness.journal_lines()] == ["put", "delete"]


@pytest.mark.gen_test
async def test_listing_is_sorted_by_code_point(api):
    keys = ["b", "a", "B", "é", "aa", "z", "😀", "ÿ"]
    await api("PUT", "/keys", {key: key for key in keys})
    listing = json.loads((await api("GET", "/keys")).body, object_pairs_hook=list)
    assert [key for key, _ in listing] == sorted(keys, key=lambda k: k.encode("utf-8"))


@pytest.mark.gen_test
async def test_listing_streams_more_keys_than_one_batch(api):
    values = {f"k{i:05d}": i for i in range(2500)}
    await api("PUT", "/keys", values)
    assert json.loads((await api("GET", "/keys")).body) == values


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("query, keys_listed", [
    ("", 20_000),  # streamed, read as fast as it is written: each flush is done at once
    ("?filter=*zzz", 0),  # streamed, every batch of the index emptied by the filter
    ("?filter=*zzz&limit=10", 0),  # a page, the same
])
async def test_a_long_listing_lets_other_requests_in_between_its_batches(
        api, harness, monkeypatch, query, keys_listed):
    """A listing that never waits on its client or the filter must still give the loop
    back as it works through the index, or every other request waits for its end
    (about a second for 200k keys). Here it gives way after every batch."""
    from kvd.handlers import keys as keys_module

    monkeypatch.setattr(keys_module, "GIVE_WAY_SECONDS", 0.0)
    pad = b'"' + b"x" * 100 + b'"'
    for start in range(0, 20_000, 5_000):
        await harness.store.write(Change(op="put", set={f"k{i:06d}": pad for i in range(start, start + 5_000)}))
    loop = asyncio.get_running_loop()
    passes = 0

    def count_loop_passes() -> None:
        nonlocal passes
        passes += 1
        if counting:
            loop.call_soon(count_loop_passes)

    passes_at_batches: list[int] = []
    scan = harness.store.scan

    def watched_scan(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for batch in scan(*args, **kwargs):
            passes_at_batches.append(passes)
            yield batch

    monkeypatch.setattr(harness.store, "scan", watched_scan)
    counting = True
    loop.call_soon(count_loop_passes)
    response = await api("GET", "/keys" + query)
    counting = False
    assert response.code == 200 and len(json.loads(response.body)) == keys_listed
    assert len(passes_at_batches) >= 20  # every batch of the index, even those the filter empties
    gaps = [later - earlier for earlier, later in itertools.pairwise(passes_at_batches)]
    assert all(gap >= 1 for gap in gaps), gaps  # another callback ran between every two batches


@pytest.mark.gen_test(timeout=60)
async def test_a_filtered_listing_is_streamed_however_few_of_each_batch_it_keeps(api, harness, monkeypatch):
    """Flushed by the bytes written, not only after full batches: a filter keeping half of
    each batch once left the whole listing in memory until its end."""
    from kvd.handlers import keys as keys_module

    monkeypatch.setattr(keys_module, "FLUSH_BYTES", 50_000)
    pad = b'"' + b"x" * 100 + b'"'
    await harness.store.write(Change(op="put", set={f"k{i:05d}{'ab'[i % 2]}": pad for i in range(10_000)}))
    flushed_sizes: list[int] = []
    real_flush = keys_module.KeysHandler.flush

    def flush(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        flushed_sizes.append(sum(len(part) for part in self._write_buffer))
        return real_flush(self, *args, **kwargs)

    monkeypatch.setattr(keys_module.KeysHandler, "flush", flush)
    response = await api("GET", "/keys?filter=*b")  # half of every batch
    assert response.code == 200 and len(json.loads(response.body)) == 5_000
    assert len(flushed_sizes) >= 8 and max(flushed_sizes) < 50_000 + 1000 * 120, flushed_sizes


@pytest.mark.gen_test
async def test_filter_listing_matches_whole_keys(api):
    await api("PUT", "/keys", dict.fromkeys(["world", "wod", "word", "sword", "k1", "k10", "x"], 0))
    response = await api("GET", "/keys?filter=" + quote("wo$d"))
    assert sorted(json.loads(response.body)) == ["wod", "word", "world"]
    response = await api("GET", "/keys?filter=k1*")
    assert sorted(json.loads(response.body)) == ["k1", "k10"]
    bad = await api("GET", "/keys?filter=" + quote("a\\"))
    assert bad.code == 400 and error_code(bad) == "bad_request"


@pytest.mark.gen_test
async def test_delete_all_is_one_entry_even_when_empty(api, harness):
    assert (await api("DELETE", "/keys")).code == 204
    await api("PUT", "/keys", {"a": 1, "b": 2})
    assert (await api("DELETE", "/keys")).code == 204
    assert json.loads((await api("GET", "/keys")).body) == {}
    assert [line["op"] for line in harness.journal_lines()] == ["clear", "put", "clear"]
    put = await api("PUT", "/keys", {"a": 3})
    assert json.loads(put.body)["revision"] == 4


@pytest.mark.gen_test
@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast-paths", "handlers-only"])
@pytest.mark.parametrize("path", ["/keys/dx", "/keys"])
@pytest.mark.parametrize("condition", [{}, {"If-Match": "*"}], ids=["plain", "if-match-star"])
@pytest.mark.parametrize(("content_type", "body", "status", "code"), [
    ("text/plain", b"hello", 415, "unsupported_media_type"),
    (None, b"hello", 415, "unsupported_media_type"),
    ("application/json", b'["dx"]', 400, "bad_request"),  # a multi-delete kvd does not have
    ("application/json", b"{}", 400, "bad_request"),
])
async def test_a_delete_with_a_body_is_refused_and_deletes_nothing(
        api, http_client, base_url, app, harness, fast_paths, path, condition, content_type, body,
        status, code):
    """A body on DELETE is never ignored: ``DELETE /keys`` with a list of keys would clear them all."""
    await api("PUT", "/keys", {"dx": 1, "other": 2})
    app.fast_paths = fast_paths
    headers = {**condition, **({"Content-Type": content_type} if content_type else {})}
    response = await http_client.fetch(base_url + path, method="DELETE", body=body, headers=headers,
                                       raise_error=False, allow_nonstandard_methods=True)
    assert response.code == status and error_code(response) == code
    if status == 400:
        assert json.loads(response.body)["error"]["message"] == "DELETE takes no body"
    assert json.loads((await api("GET", "/keys")).body) == {"dx": 1, "other": 2}
    assert len(harness.journal_lines()) == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/keys/dx", "/keys"])
async def test_a_delete_with_an_empty_body_still_deletes(api, harness, path):
    await api("PUT", "/keys", {"dx": 1})
    response = await api("DELETE", path, raw=b"", headers={"Content-Type": "text/plain"})
    assert response.code == 204
    assert (await api("GET", "/keys/dx")).code == 404


# --- bad input ----------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast-paths", "handlers-only"])
@pytest.mark.parametrize("method, path, body", [
    ("PUT", "/keys", b'{"k": 2}'), ("PUT", "/keys/k", b"2"), ("PATCH", "/keys/k", b'{"x": 2}'),
    ("DELETE", "/keys/k", b"2"), ("DELETE", "/keys", b"2"),
])
@pytest.mark.parametrize("coding, compress", [("gzip", True), ("gzip", False), ("deflate, identity", False)])
async def test_a_body_with_a_content_encoding_is_415_naming_it_and_changes_nothing(
        api, app, harness, fast_paths, method, path, body, coding, compress):
    """kvd decompresses nothing: a gzipped body is no "malformed JSON", nor a plain one
    that says it is gzipped stored as it is."""
    await api("PUT", "/keys", {"k": 1})
    app.fast_paths = fast_paths
    response = await api(method, path, raw=gzip.compress(body) if compress else body,
                         headers={"Content-Encoding": coding})
    assert response.code == 415 and error_code(response) == "unsupported_media_type"
    assert json.loads(response.body)["error"]["message"] == (
        f"Content-Encoding {coding.split(',')[0]} is not supported: send the body uncompressed")
    assert json.loads((await api("GET", "/keys")).body) == {"k": 1}
    assert len(harness.journal_lines()) == 1


@pytest.mark.gen_test
async def test_content_encoding_identity_is_a_plain_body_and_a_read_may_carry_any(api, harness):
    assert (await api("PUT", "/keys/k", raw=b"1", headers={"Content-Encoding": "Identity"})).code == 201
    assert (await api("GET", "/keys/k", headers={"Content-Encoding": "gzip"})).body == b'{"k":1}'
    assert (await api("DELETE", "/keys/k", headers={"Content-Encoding": "gzip"})).code == 204


BAD_BODIES = [
    (b"{", "bad_request"),
    (b"[1,2]", "bad_request"),
    (b"{}", "bad_request"),
    (b'"text"', "bad_request"),
    (b'{"a": NaN}', "bad_request"),
    (b'{"a": Infinity}', "bad_request"),
    (b'{"a": 1e999}', "bad_request"),
    (b'{"": 1}', "bad_request"),
    (b'{"a\\u0001": 1}', "bad_request"),
    (b'{"a\\u007f": 1}', "bad_request"),
    (json.dumps({"k" * 1025: 1}).encode(), "bad_request"),
    (json.dumps({"é" * 513: 1}).encode(), "bad_request"),  # 1026 bytes, 513 characters
    (b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}", "bad_request"),
    (b'{"a": "\\ud800"}', "bad_request"),
    (b"\xff\xfe", "bad_request"),
    (b"", "bad_request"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize(("raw", "code"), BAD_BODIES)
async def test_bad_body_is_rejected_and_writes_nothing(api, harness, raw, code):
    await api("PUT", "/keys", {"keep": 1})
    response = await api("PUT", "/keys", raw=raw)
    assert response.code == 400
    assert error_code(response) == code
    assert json.loads((await api("GET", "/keys")).body) == {"keep": 1}
    assert len(harness.journal_lines()) == 1
    assert json.loads((await api("PUT", "/keys", {"next": 1})).body)["revision"] == 2


@pytest.mark.gen_test
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(http_client, base_url, harness, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = await http_client.fetch(
        base_url + "/keys", method="PUT", body=b'{"a":1}', headers=headers, raise_error=False
    )
    assert response.code == 415
    assert error_code(response) == "unsupported_media_type"
    assert harness.journal_lines() == []


@pytest.mark.gen_test
async def test_json_content_type_with_charset_is_accepted(api):
    response = await api("PUT", "/keys", {"a": 1},
                         headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.code == 200


@pytest.mark.gen_test
@pytest.mark.parametrize("target", ["/keys", "/keys/k"])  # /keys/k: kvd's own fast write paths too
@pytest.mark.parametrize("charset", ["iso-8859-1", '"utf-16"', "latin1"])
async def test_a_body_in_another_charset_is_415_not_read_as_utf8(api, harness, target, charset):
    body = b'{"k": "caf\xe9"}' if target == "/keys" else b'"caf\xe9"'
    response = await api("PUT", target, raw=body,
                         headers={"Content-Type": f"application/json; charset={charset}"})
    assert response.code == 415 and error_code(response) == "unsupported_media_type"
    assert charset.strip('"') in json.loads(response.body)["error"]["message"]
    assert harness.journal_lines() == []


@pytest.mark.gen_test
@pytest.mark.parametrize("content_type", ["application/json; charset=UTF-8", 'application/json;charset="utf-8"',
                                          "application/json; charset=utf8", "application/json; foo=bar"])
async def test_a_utf8_charset_or_another_parameter_is_accepted(api, content_type):
    for target, body in (("/keys", b'{"k": "caf\xc3\xa9"}'), ("/keys/j", b'"caf\xc3\xa9"')):
        response = await api("PUT", target, raw=body, headers={"Content-Type": content_type})
        assert response.code in (200, 201), (target, response.body)
    assert json.loads((await api("GET", "/keys")).body) == {"j": "café", "k": "café"}


@pytest.mark.gen_test
async def test_value_over_limit_is_413(api, harness):
    limit = harness.ctx.config.server.max_value_bytes
    response = await api("PUT", "/keys", {"a": "x" * limit})  # limit + 2 quote bytes
    assert response.code == 413 and error_code(response) == "payload_too_large"
    assert (await api("PUT", "/keys", {"a": "x" * (limit - 2)})).code == 200


@pytest.mark.gen_test
async def test_body_over_limit_is_413(api, harness):
    limit = harness.ctx.config.server.max_body_bytes
    response = await api("PUT", "/keys", raw=b'{"a":"' + b"x" * limit + b'"}')
    assert response.code == 413 and error_code(response) == "payload_too_large"
    assert harness.journal_lines() == []


@pytest.mark.gen_test
@pytest.mark.parametrize("path, body", [("/keys", {"a": 1}), ("/keys/a", 1)])
@pytest.mark.parametrize("expire_in", [
    "0", "-1", "abc", "nan", "inf", "315360001", "",
    # Over the limit by less than a double can tell: compared exactly, not as floats.
    "315360000.0000000001", "3.1536000000000000001e8", "1e99999999999999999999", "1e-99999999999999999999",
])
async def test_bad_expire_in_is_400(api, harness, path, body, expire_in):
    response = await api("PUT", f"{path}?expire_in=" + quote(expire_in), body)
    assert response.code == 400 and error_code(response) == "bad_request"
    assert "positive" in json.loads(response.body)["error"]["message"]  # -1 is a number; say what is wanted
    assert harness.journal_lines() == []


@pytest.mark.gen_test
@pytest.mark.parametrize("path, body", [("/keys", {"a": 1}), ("/keys/a", 1)])
@pytest.mark.parametrize("expire_in", ["315360000", "315360000.0000000000", "3.1536e8", "1e-9"])
async def test_expire_in_up_to_the_limit_exactly_is_accepted(api, harness, path, body, expire_in):
    response = await api("PUT", f"{path}?expire_in={expire_in}", body)
    assert response.code in (200, 201), response.body
    assert len(harness.journal_lines()) == 1


@pytest.mark.gen_test
async def test_unknown_route_is_404_json(api):
    response = await api("GET", "/nothing/here")
    assert response.code == 404 and error_code(response) == "not_found"


@pytest.mark.gen_test
async def test_unsupported_method_is_405_with_allow(api):
    response = await api("POST", "/keys", {"a": 1})
    assert response.code == 405 and error_code(response) == "method_not_allowed"
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}
    response = await api("PUT", "/healthz", {"a": 1})
    assert response.code == 405 and response.headers["Allow"] == "GET, HEAD"


@pytest.mark.gen_test
async def test_health_and_ready(api):
    health = await api("GET", "/healthz")
    assert health.code == 200 and json.loads(health.body) == {"status": "ok"}
    assert (await api("GET", "/readyz")).code == 200


@pytest.mark.gen_test
async def test_not_ready_answers_503_on_keys_and_readyz(api, harness):
    harness.store.ready = False
    for path in ("/readyz", "/keys", "/keys/a"):
        response = await api("GET", path)
        assert response.code == 503 and error_code(response) == "unavailable"
        assert response.headers["Retry-After"] == "1"
    assert (await api("GET", "/healthz")).code == 200
    head = await api("HEAD", "/readyz")  # for load balancers that check with HEAD
    assert head.code == 503 and head.headers["Retry-After"] == "1"


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_and_ready_answer_head_as_get_without_the_body(api, path):
    get, head = await api("GET", path), await api("HEAD", path)
    assert head.code == get.code == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(get.body))


@pytest.mark.gen_test
async def test_bad_utf8_in_path_and_query_is_400(api):
    assert (await api("GET", "/keys/%ff")).code == 400
    response = await api("GET", "/keys?filter=%ff")
    assert response.code == 400 and error_code(response) == "bad_request"


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/keys?at=1", "/keys/k?at=2026-11-27T00:00:00Z"])
async def test_at_on_a_write_is_refused_not_ignored(api, path):
    # GET/HEAD with ?at= read the past (tests/test_time_travel.py); a write cannot take it.
    await api("PUT", "/keys", {"k": 1})
    response = await api("PUT", path, {"k": 2} if path.startswith("/keys?") else 2)
    assert response.code == 400 and "?at=" in json.loads(response.body)["error"]["message"]
    assert json.loads((await api("GET", "/keys")).body) == {"k": 1}


@pytest.mark.gen_test
@pytest.mark.parametrize("method, target, body, unknown", [
    ("PUT", "/keys?expires_in=60", {"k": 2}, "expires_in"),  # a misspelt expire_in
    ("PUT", "/keys/k?expire_in=60&ttl=5", 2, "ttl"),
    ("PATCH", "/keys/k?limit=1", {"x": 1}, "limit"),
    ("DELETE", "/keys/k?force=1", None, "force"),
    ("DELETE", "/keys?filter=tmp*", None, "filter"),  # ignored, it would delete every key
])
async def test_an_unknown_query_parameter_on_a_write_is_a_400_and_writes_nothing(
    api, harness, method, target, body, unknown
):
    await api("PUT", "/keys", {"k": 1, "tmp1": 1})
    response = await api(method, target, body)
    assert response.code == 400 and error_code(response) == "bad_request"
    assert repr(unknown) in json.loads(response.body)["error"]["message"]
    assert len(harness.journal_lines()) == 1
    assert json.loads((await api("GET", "/keys")).body) == {"k": 1, "tmp1": 1}


@pytest.mark.gen_test
async def test_reads_ignore_unknown_query_parameters(api):
    """A cache-busting parameter changes nothing on a read (README: only writes refuse them)."""
    await api("PUT", "/keys", {"k": 1})
    assert json.loads((await api("GET", "/keys/k?_=1700000000")).body) == {"k": 1}
    assert json.loads((await api("GET", "/keys?_=1700000000")).body) == {"k": 1}
    assert (await api("HEAD", "/keys/k?_=1")).code == 200


@pytest.mark.gen_test
async def test_the_parameters_writes_take_still_work(api, harness):
    assert (await api("PUT", "/keys/k?expire_in=60", 1)).code == 201
    assert (await api("PUT", "/keys?expire_in=60", {"j": 1})).code == 200
    assert [set(record.get("expires", ())) for record in harness.journal_lines()] == [
        {"k"}, {"j"},
    ]
    response = await api("PATCH", "/keys/k?expire_in=5", {"x": 1})  # its own message, as before
    assert response.code == 400 and "keeps the key's expiry" in json.loads(response.body)["error"]["message"]


@pytest.mark.gen_test(timeout=30)
async def test_a_client_hanging_up_on_a_streamed_listing_logs_no_error(api, base_url, caplog):
    """``curl /keys | head`` is ordinary: the listing stops quietly, nothing is logged as an
    error (the log would also carry the raw URI, filter and all), and the server serves on."""
    value = "v" * 1000
    for start in range(0, 6000, 1000):
        await api("PUT", "/keys", {f"k{n:05d}": value for n in range(start, start + 1000)})
    host, port = base_url.removeprefix("http://").split(":")
    caplog.clear()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /keys?filter=k* HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readexactly(1000)).startswith(b"HTTP/1.1 200")
    writer.transport.abort()  # gone with most of 6 MB unsent
    for _ in range(20):  # the handler meets the closed stream at its next flush
        await asyncio.sleep(0.05)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        if errors:
            break
    assert errors == []
    assert json.loads((await api("GET", "/keys?limit=1")).body) == {"k00000": value}


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/metrics", "/openapi.json"])
async def test_head_is_answered_wherever_get_is(api, path):
    """RFC 9110 section 9.3.2: monitoring probes check /metrics with HEAD (was a 405)."""
    get, head = await api("GET", path), await api("HEAD", path)
    assert get.code == head.code == 200 and head.body == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert int(head.headers["Content-Length"]) > 0


@pytest.mark.gen_test
async def test_head_length_is_what_get_would_send(api):
    await api("PUT", "/keys", {"k": {"a": [1, 2, 3]}})
    get = await api("GET", "/keys/k")
    head = await api("HEAD", "/keys/k")
    assert int(head.headers["Content-Length"]) == len(get.body)


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/keys/absent", "/keys/k?at=junk", "/keys/%ff"])
async def test_an_error_head_length_is_what_get_would_send_too(api, path):
    """RFC 9110 section 8.6: a HEAD answer's Content-Length, when sent, is the length of what
    GET would send; an error's was 0."""
    await api("PUT", "/keys", {"k": 1})
    get = await api("GET", path)
    head = await api("HEAD", path)
    assert head.code == get.code >= 400 and head.body == b""
    assert int(head.headers["Content-Length"]) == len(get.body)
    assert head.headers["Content-Type"] == "application/json"


@pytest.mark.gen_test
@pytest.mark.parametrize("query", ["", "?limit=2", "?filter=k1*", "?limit=0", "?filter=%5Bz"])
async def test_head_of_a_listing_has_what_get_would_send_but_the_body(api, query):
    """HEAD /keys (the original Flask service answered it; kvd said 405)."""
    await api("PUT", "/keys", {f"k{n}": n for n in range(5)})
    get = await api("GET", "/keys" + query)
    head = await api("HEAD", "/keys" + query)
    assert head.code == get.code and head.body == b""
    for name in ("Content-Type", "Content-Length", "Link"):
        assert head.headers.get(name) == get.headers.get(name), name


@pytest.mark.gen_test
async def test_head_of_a_streamed_listing_has_no_length_like_its_get(api):
    from kvd.handlers.keys import LISTING_BATCH

    await api("PUT", "/keys", {f"k{n:05d}": n for n in range(LISTING_BATCH + 1)})
    get = await api("GET", "/keys")
    head = await api("HEAD", "/keys")
    assert len(json.loads(get.body)) == LISTING_BATCH + 1
    assert "Content-Length" not in get.headers  # streamed: chunked
    assert head.code == 200 and head.body == b"" and "Content-Length" not in head.headers


@pytest.mark.gen_test
async def test_listing_has_no_etag_so_no_stale_304(api):
    await api("PUT", "/keys", {"k": 1})
    response = await api("GET", "/keys")
    assert "ETag" not in response.headers
