"""Attribution: with ``journal.record_client`` on, each write's record names the client address.

(The acting principal, ``actor``, comes from the auth plugin: tests/test_auth.py.)
"""

from __future__ import annotations

import pytest
from conftest import build_harness


@pytest.fixture
def plugin_settings():
    return {"journal.record_client": True}


@pytest.mark.gen_test
async def test_every_kind_of_write_records_the_client_address(api, harness):
    assert (await api("PUT", "/keys", {"a": 1, "b": 2})).code == 200
    assert (await api("PUT", "/keys/c", 3)).code == 201  # the fast path steps aside
    patched = await api("PATCH", "/keys/c", 4, headers={"Content-Type": "application/merge-patch+json"})
    assert patched.code == 200
    assert (await api("DELETE", "/keys/a")).code == 204
    assert (await api("DELETE", "/keys")).code == 204
    lines = harness.journal_lines()
    assert [line["op"] for line in lines] == ["put", "put", "put", "delete", "clear"]
    assert {line["client"] for line in lines} == {"127.0.0.1"}


@pytest.mark.gen_test
async def test_by_default_no_client_is_recorded(http_client, served, tmp_path):
    default = build_harness(tmp_path / "default")
    url = served(default)
    for path, body in (("/keys/c", b"3"), ("/keys", b'{"d": 4}')):
        response = await http_client.fetch(
            url + path, method="PUT", body=body, headers={"Content-Type": "application/json"}
        )
        assert response.code in (200, 201)
    assert [("client" in line) for line in default.journal_lines()] == [False, False]
