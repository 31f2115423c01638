"""Plugins: loading by name, dotted path and entry point; every hook's contract."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from typing import Any

import pytest
from conftest import REPO, build_harness

from kvd.config import ConfigError, load_config
from kvd.hookspecs import all_hook_names
from kvd.plugins import make_plugin_manager, resolve_plugin

RECORDER = "sample_plugins:Recorder"
BUILTINS = ["expiry", "metrics", "filter"]


def recorder_of(harness: Any) -> Any:
    return harness.ctx.plugins.get_plugin(RECORDER)


@pytest.fixture
def plugin_settings() -> dict[str, Any]:
    return {"plugins.enabled": [*BUILTINS, RECORDER]}


async def fetch(http_client: Any, base_url: str, method: str, path: str, body: Any = None) -> Any:
    return await http_client.fetch(
        base_url + path, method=method, raise_error=False,
        body=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json"} if body is not None else {},
    )


# --- loading --------------------------------------------------------------------


def test_builtins_resolve_by_short_name():
    for name in BUILTINS:
        assert resolve_plugin(name).__name__ == f"kvd.plugins.{name}"


def test_unknown_plugin_name_is_a_config_error():
    config = load_config(None, environ={}, overrides={"plugins.enabled": ["nope"]})
    with pytest.raises(ConfigError, match="no plugin named 'nope'"):
        make_plugin_manager(config)


def test_unimportable_dotted_path_is_a_config_error():
    config = load_config(None, environ={}, overrides={"plugins.enabled": ["no.such.module"]})
    with pytest.raises(ConfigError, match="cannot import 'no.such.module'"):
        make_plugin_manager(config)


def test_each_app_gets_its_own_plugin_instances(tmp_path):
    first = build_harness(tmp_path / "a")
    second = build_harness(tmp_path / "b")
    try:
        assert first.ctx.plugins.get_plugin("metrics") is not second.ctx.plugins.get_plugin("metrics")
    finally:
        first.journal.close_sync()
        second.journal.close_sync()


@pytest.fixture
def example_plugin_path(monkeypatch):  # noqa: ANN201
    monkeypatch.syspath_prepend(str(REPO / "examples" / "readonly_keys"))


def test_example_plugin_loads_by_dotted_path_and_rejects_locked_keys(tmp_path, example_plugin_path):
    harness = build_harness(
        tmp_path / "data",
        **{"plugins.enabled": [*BUILTINS, "kvd_readonly_keys"],
           "plugins.kvd_readonly_keys": {"patterns": ["config/*"]}},
    )
    try:
        plugin = harness.ctx.plugins.get_plugin("kvd_readonly_keys")
        assert plugin.is_locked("config/a") and not plugin.is_locked("data/a")
    finally:
        harness.journal.close_sync()


def test_example_plugin_loads_by_entry_point(tmp_path, monkeypatch):
    """An installed distribution's entry point in group ``kvd`` is found by name."""
    site = tmp_path / "site"
    dist_info = site / "kvd_readonly_keys-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvd-readonly-keys\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text("[kvd]\nreadonly = kvd_readonly_keys\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(REPO / "examples" / "readonly_keys"))
    config = load_config(
        None, environ={},
        overrides={"plugins.enabled": ["readonly"], "plugins.readonly": {"patterns": ["x*"]}},
    )
    manager = make_plugin_manager(config)
    assert manager.get_plugin("readonly").is_locked("xy")
    listing = subprocess.run(
        [sys.executable, "-m", "kvd", "plugins"], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": f"{site}:{REPO / 'examples' / 'readonly_keys'}", "PATH": ""},
        cwd=tmp_path,
    )
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert set(lines) >= {*BUILTINS, "readonly"}
    assert " disabled " in lines["readonly"]
    assert " enabled " in lines["metrics"]


@pytest.mark.gen_test
async def test_example_plugin_answers_403_and_writes_nothing(http_client, served, tmp_path,
                                                              example_plugin_path):
    locked = build_harness(
        tmp_path / "locked",
        **{"plugins.enabled": [*BUILTINS, "kvd_readonly_keys"],
           "plugins.kvd_readonly_keys": {"patterns": ["config/*"]}},
    )
    url = served(locked)
    response = await fetch(http_client, url, "PUT", "/keys", {"data/a": 1, "config/a": 2})
    assert response.code == 403
    assert json.loads(response.body)["error"] == {
        "code": "forbidden", "message": "key 'config/a' is read-only"}
    assert locked.journal_lines() == []
    assert (await fetch(http_client, url, "PUT", "/keys", {"data/a": 1})).code == 200
    assert (await fetch(http_client, url, "DELETE", "/keys")).code == 204  # nothing locked yet
    assert [line["op"] for line in locked.journal_lines()] == ["put", "clear"]


# --- every hook -------------------------------------------------------------------


@pytest.mark.gen_test
async def test_hook_register_routes_adds_routes_but_cannot_shadow_keys(http_client, base_url, harness):
    response = await fetch(http_client, base_url, "GET", "/recorder")
    assert json.loads(response.body) == {"echo": "hi"}
    listing = await fetch(http_client, base_url, "GET", "/keys")
    assert json.loads(listing.body) == {}  # the core route, not the plugin's "shadow"


def test_hook_check_routes_sees_every_served_route_with_its_scopes(app, harness):
    [call] = recorder_of(harness).calls["check_routes"]
    endpoints = call["endpoints"]
    assert endpoints["/keys/{id}"] == {"GET": "read", "HEAD": "read", "PUT": "write",
                                       "PATCH": "write", "DELETE": "write"}
    assert endpoints["/metrics"] == {"GET": "admin", "HEAD": "admin"}  # a plugin's route
    assert endpoints["/journal/compact"] == {"POST": "admin"}
    assert endpoints["/healthz"] == endpoints["/openapi.json"] == {}  # always open
    assert endpoints["/recorder"] == {}  # a plain RequestHandler: named by its pattern, open
    assert "unmatched" not in endpoints


def test_hook_check_routes_error_stops_start_up_naming_the_plugin(tmp_path):
    from kvd.handlers import make_app

    harness = build_harness(tmp_path / "d", **{"plugins.enabled": ["sample_plugins:RouteRefuser"]})
    try:
        with pytest.raises(ConfigError, match=r"^plugins\.sample_plugins:RouteRefuser: needs a /reports route$"):
            make_app(harness.ctx)
    finally:
        harness.journal.close_sync()


@pytest.mark.gen_test
async def test_hook_register_metrics_adds_to_the_app_registry(http_client, base_url, harness):
    response = await fetch(http_client, base_url, "GET", "/metrics")
    assert "recorder_things_total 3.0" in response.body.decode()


@pytest.mark.gen_test
async def test_hook_periodic_tasks_run_repeatedly(harness):
    await asyncio.sleep(0.2)
    assert recorder_of(harness).ticks >= 3


def test_hook_startup_runs_once_when_ready(harness):
    assert recorder_of(harness).calls["startup"] == [{"ready": True}]


def test_hook_shutdown_is_called_by_the_server(harness):
    harness.ctx.plugins.hook.shutdown(ctx=harness.ctx)
    assert recorder_of(harness).calls["shutdown"] == [{}]


@pytest.mark.gen_test
async def test_hook_validate_write_rejects_and_nothing_is_written(http_client, base_url, harness):
    response = await fetch(http_client, base_url, "PUT", "/keys", {"ok": 1, "forbidden": 2})
    assert response.code == 403
    assert json.loads(response.body)["error"]["code"] == "forbidden"
    assert harness.journal_lines() == []
    assert (await fetch(http_client, base_url, "GET", "/keys/ok")).code == 404
    assert (await fetch(http_client, base_url, "PUT", "/keys", {"ok": 1})).code == 200


@pytest.mark.gen_test
async def test_hook_transform_read_hides_and_rewrites(http_client, base_url, harness):
    await fetch(http_client, base_url, "PUT", "/keys", {"secret": 1, "shout": "hey", "plain": "x"})
    assert (await fetch(http_client, base_url, "GET", "/keys/secret")).code == 404
    shout = await fetch(http_client, base_url, "GET", "/keys/shout")
    assert json.loads(shout.body) == {"shout": "HEY"}
    listing = json.loads((await fetch(http_client, base_url, "GET", "/keys")).body)
    assert listing == {"plain": "x", "shout": "HEY"}
    # the stored value is unchanged
    assert harness.store.get("shout").value == b'"hey"'


@pytest.mark.gen_test
async def test_hook_request_finished_gets_route_templates_not_keys(http_client, base_url, harness):
    await fetch(http_client, base_url, "GET", "/keys/some-secret-key")
    calls = recorder_of(harness).calls["request_finished"]
    assert calls[-1] == {"method": "GET", "endpoint": "/keys/{id}", "status": 404}


@pytest.mark.gen_test
async def test_hook_after_commit_sees_each_record_in_order(http_client, base_url, harness):
    await fetch(http_client, base_url, "PUT", "/keys", {"a": 1})
    await fetch(http_client, base_url, "DELETE", "/keys/a")
    await fetch(http_client, base_url, "DELETE", "/keys")
    assert recorder_of(harness).calls["after_commit"] == [
        {"seq": 1, "op": "put"}, {"seq": 2, "op": "delete"}, {"seq": 3, "op": "clear"},
    ]


@pytest.mark.gen_test
async def test_hook_journal_synced_reports_batches(http_client, base_url, harness):
    await asyncio.gather(*(
        fetch(http_client, base_url, "PUT", "/keys", {f"k{i}": i}) for i in range(20)
    ))
    synced = recorder_of(harness).calls["journal_synced"]
    assert sum(call["records"] for call in synced) == 20
    assert len(synced) < 20  # concurrent writes shared fsyncs


@pytest.mark.gen_test
async def test_hook_resolve_expiry_first_answer_wins(tmp_path):
    harness = build_harness(tmp_path / "d", **{"plugins.enabled": ["sample_plugins:ExpiryAnswer", "expiry"]})
    try:
        hook = harness.ctx.plugins.hook.resolve_expiry
        assert hook(expire_in="fixed", now=10.0) == 1010.0
        assert hook(expire_in="5", now=10.0) == 15.0  # the expiry plugin answers the rest
    finally:
        harness.ctx.stop_periodic_tasks()
        harness.journal.close_sync()


@pytest.mark.gen_test
async def test_hook_internal_error_counts_failing_observers_and_loses_nothing(
        http_client, served, tmp_path):
    harness = build_harness(
        tmp_path / "d", **{"plugins.enabled": [*BUILTINS, RECORDER, "sample_plugins:FailingObserver"]}
    )
    url = served(harness)
    response = await fetch(http_client, url, "PUT", "/keys", {"a": 1})
    assert response.code == 200
    assert json.loads((await fetch(http_client, url, "GET", "/keys/a")).body) == {"a": 1}
    await asyncio.sleep(0.1)  # the failing periodic task ran a few times
    errors = [call["error"] for call in recorder_of(harness).calls["internal_error"]]
    assert "plugin_sample_plugins:FailingObserver" in errors
    assert "task_explode" in errors
    metrics = (await fetch(http_client, url, "GET", "/metrics")).body.decode()
    assert re.search(
        r'internal_error_count_total\{error="plugin_sample_plugins:FailingObserver"\} 1\.0', metrics
    )
    # the recorder (registered after) still observed the write
    assert recorder_of(harness).calls["after_commit"] == [{"seq": 1, "op": "put"}]


@pytest.mark.gen_test
async def test_an_after_commit_plugin_has_its_error_series_from_start_up(api):
    text = (await api("GET", "/metrics")).body.decode()
    assert f'internal_error_count_total{{error="plugin_{RECORDER}"}} 0.0' in text


# --- docs and tests stay in step with the specs --------------------------------------


def test_every_hook_has_a_test_and_docs():
    sources = "".join(path.read_text() for path in (REPO / "tests").glob("test_*.py"))
    docs = (REPO / "docs" / "plugins.md").read_text()
    for name in all_hook_names():
        assert f"def test_hook_{name}_" in sources, f"hook {name} has no test_hook_{name}_* test"
        assert f"### `{name}`" in docs, f"hook {name} is not documented in docs/plugins.md"


def test_disabled_plugin_feature_names_the_plugin(tmp_path):
    harness = build_harness(tmp_path / "d", **{"plugins.enabled": []})
    try:
        assert harness.ctx.plugins.hook.compile_filter(pattern="a*") is None
        assert harness.ctx.plugins.hook.resolve_expiry(expire_in="1", now=0.0) is None
    finally:
        harness.journal.close_sync()


@pytest.mark.gen_test
async def test_hook_authenticate_refuses_and_names_the_actor(http_client, served, tmp_path):
    harness = build_harness(tmp_path / "d", **{"plugins.enabled": [*BUILTINS, "sample_plugins:HeaderAuth"]})
    url = served(harness)

    async def send(method: str, path: str, who: str | None, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json"} | ({"X-Who": who} if who else {})
        return await http_client.fetch(url + path, method=method, headers=headers, raise_error=False,
                                       body=None if body is None else json.dumps(body))

    assert (await send("PUT", "/keys", None, {"a": 1})).code == 401
    assert (await send("PUT", "/keys", "reader", {"a": 1})).code == 403
    assert harness.journal_lines() == []
    assert (await send("PUT", "/keys", "alice", {"a": 1})).code == 200
    assert (await send("GET", "/keys/a", "reader")).code == 200
    assert (await send("GET", "/keys/a", None)).code == 401
    assert (await send("GET", "/metrics", "reader")).code == 403  # metrics need admin
    assert (await send("GET", "/healthz", None)).code == 200  # always open
    assert [line.get("actor") for line in harness.journal_lines()] == ["alice"]
