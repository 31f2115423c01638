"""The expiry and metrics plugins, and what answers when a plugin is switched off."""

from __future__ import annotations

import ast
import json
import re
from typing import Any
from urllib.parse import quote

import pytest
from conftest import REPO, build_harness
from tests_support import FakeClock

from kvd.app import ERROR_LABELS


@pytest.fixture
def plugin_settings() -> dict[str, Any]:
    # A sweep every 60 s: tests decide when expired keys are swept.
    return {"plugins.expiry": {"sweep_interval": 60}}


@pytest.fixture
def clock(harness) -> FakeClock:  # noqa: ANN001
    fake = FakeClock()
    harness.store.clock = fake
    return fake


def expiry_plugin(harness):  # noqa: ANN001, ANN201
    return harness.ctx.plugins.get_plugin("expiry")


@pytest.mark.gen_test
async def test_expired_key_reads_as_absent_everywhere_at_once(api, harness, clock):
    await api("PUT", "/keys?expire_in=10", {"temp": 1, "tempo": 2})
    await api("PUT", "/keys", {"keep": 3})
    assert (await api("GET", "/keys/temp")).code == 200
    clock.now += 10  # the expiry instant itself counts as expired
    assert (await api("GET", "/keys/temp")).code == 404
    assert (await api("HEAD", "/keys/temp")).code == 404
    assert json.loads((await api("GET", "/keys")).body) == {"keep": 3}
    assert json.loads((await api("GET", "/keys?filter=temp*")).body) == {}
    assert (await api("DELETE", "/keys/temp")).code == 404
    # nothing was swept yet: hiding does not depend on the sweep
    assert [line["op"] for line in harness.journal_lines()] == ["put", "put"]


@pytest.mark.gen_test
async def test_fractional_expire_in_is_absolute_in_the_journal(api, harness, clock):
    await api("PUT", "/keys?expire_in=1.5", {"k": 1})
    line = harness.journal_lines()[0]
    assert line["expires"] == {"k": "2027-01-15T08:00:01.500000Z"}


@pytest.mark.gen_test
async def test_sweep_journals_expire_records_and_counts_lag(api, harness, clock):
    await api("PUT", "/keys?expire_in=5", {"a": 1, "b": 2})
    await api("PUT", "/keys", {"c": 3})
    clock.now += 7
    removed = await expiry_plugin(harness).sweep(harness.ctx)
    assert removed == 2
    last = harness.journal_lines()[-1]
    assert last["op"] == "expire" and sorted(last["keys"]) == ["a", "b"]
    assert len(harness.store) == 1
    assert await expiry_plugin(harness).sweep(harness.ctx) == 0  # nothing twice
    metrics = (await api("GET", "/metrics")).body.decode()
    assert "kvd_expired_keys_total 2.0" in metrics
    # both keys were removed 2 s after their expiry
    assert 'kvd_expiry_lag_seconds_bucket{le="1.0"} 0.0' in metrics
    assert 'kvd_expiry_lag_seconds_bucket{le="2.5"} 2.0' in metrics


@pytest.mark.gen_test
async def test_rewrite_without_expire_in_removes_expiry_and_sweep_spares_it(api, harness, clock):
    await api("PUT", "/keys?expire_in=5", {"k": 1})
    await api("PUT", "/keys", {"k": 2})
    clock.now += 100
    assert await expiry_plugin(harness).sweep(harness.ctx) == 0
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": 2}


@pytest.mark.gen_test
async def test_put_over_an_expired_key_creates_it_afresh(api, harness, clock):
    await api("PUT", "/keys?expire_in=1", {"k": 1})
    clock.now += 2
    await api("PUT", "/keys?expire_in=100", {"k": 2})
    assert await expiry_plugin(harness).sweep(harness.ctx) == 0  # the new write is not swept
    assert json.loads((await api("GET", "/keys/k")).body) == {"k": 2}


@pytest.mark.gen_test
async def test_restart_never_extends_a_keys_life(api, harness, clock, tmp_path):
    await api("PUT", "/keys?expire_in=30", {"k": 1})
    harness.ctx.stop_periodic_tasks()
    await harness.journal.close()
    reopened = build_harness(harness.data_dir)
    try:
        reopened.store.clock = FakeClock(clock.now + 29)
        assert reopened.store.get("k") is not None
        reopened.store.clock = FakeClock(clock.now + 31)
        assert reopened.store.get("k") is None
    finally:
        reopened.ctx.stop_periodic_tasks()
        reopened.journal.close_sync()


@pytest.mark.gen_test
async def test_replay_of_an_expire_record_removes_the_key_whatever_the_clock(api, harness, clock):
    await api("PUT", "/keys?expire_in=5", {"k": 1})
    clock.now += 6
    await expiry_plugin(harness).sweep(harness.ctx)
    harness.ctx.stop_periodic_tasks()
    await harness.journal.close()
    reopened = build_harness(harness.data_dir)
    try:
        reopened.store.clock = FakeClock(0.0)  # a clock far in the past
        assert reopened.store.get("k") is None and len(reopened.store) == 0
    finally:
        reopened.ctx.stop_periodic_tasks()
        reopened.journal.close_sync()


# --- metrics ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_metrics_exposes_request_store_and_journal_metrics(api, harness):
    await api("PUT", "/keys", {"secret-key-name": 1})
    await api("GET", "/keys/" + quote("secret-key-name"))
    await api("GET", "/keys/absent-key")
    response = await api("GET", "/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    assert 'request_count_total{endpoint="/keys/{id}",method="GET",status="200"} 1.0' in text
    assert 'request_count_total{endpoint="/keys/{id}",method="GET",status="404"} 1.0' in text
    assert 'request_latency_seconds_count{endpoint="/keys",method="PUT"} 1.0' in text
    assert "# TYPE internal_error_count_total counter" in text
    for name in ("kvd_keys 1.0", "kvd_journal_bytes", "kvd_fsync_seconds_count",
                 "kvd_commit_batch_records_count", "kvd_replay_seconds", "kvd_revision 1.0",
                 "kvd_expired_keys_total", "kvd_expiry_lag_seconds_count"):
        assert name in text, name
    assert "secret-key-name" not in text and "absent-key" not in text


@pytest.mark.gen_test
async def test_a_fresh_server_shows_the_known_error_series_at_zero(api):
    # "no data" on a healthy server would leave rate() and alerts on it empty
    text = (await api("GET", "/metrics")).body.decode()
    for label in (*ERROR_LABELS, "task_expiry_sweep", "task_compaction"):
        assert f'internal_error_count_total{{error="{label}"}} 0.0' in text, label


def test_every_fixed_error_label_is_in_error_labels():
    """Each report_error call passes a label from ERROR_LABELS, a plugin_/task_ one, or the
    class name of an exception a handler did not expect: a new fixed label cannot be
    left showing no data by forgetting it there."""
    fixed, others = set(), []
    for path in sorted((REPO / "kvd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "report_error":
                label = node.args[0]
                if isinstance(label, ast.Constant):
                    fixed.add(label.value)
                else:
                    others.append(ast.unparse(label))
    assert fixed == set(ERROR_LABELS)
    assert sorted(others) == [
        "f'plugin_{impl.plugin_name}'",  # AppContext.error_labels knows these
        "f'task_{task.name}'",
        "type(exc).__name__ if exc else 'unknown'",  # handlers/base.py: not known in advance
    ]


@pytest.mark.gen_test
async def test_a_method_the_client_makes_up_is_counted_as_other(api):
    for method in ("BREW", "XYZZY1", "XYZZY2"):
        assert (await api(method, "/keys/k")).code == 405
    text = (await api("GET", "/metrics")).body.decode()
    assert 'request_count_total{endpoint="/keys/{id}",method="other",status="405"} 3.0' in text
    assert "BREW" not in text and "XYZZY" not in text


def test_no_metric_label_can_carry_a_raw_key():
    from kvd.handlers import core_routes

    for _, handler, _ in core_routes(None):  # type: ignore[arg-type]
        # a fixed template: no regex group, nothing taken from the request path
        assert "(" not in handler.endpoint
        assert re.fullmatch(r"/[a-z/{}.]*", handler.endpoint)


# --- plugins switched off --------------------------------------------------------------


@pytest.mark.gen_test
async def test_switched_off_plugins_answer_naming_the_plugin(http_client, served, tmp_path):
    bare = build_harness(tmp_path / "bare", **{"plugins.enabled": []})
    url = served(bare)
    put = await http_client.fetch(url + "/keys?expire_in=5", method="PUT", body=b'{"a":1}',
                                  headers={"Content-Type": "application/json"},
                                  raise_error=False)
    assert put.code == 400 and "'expiry' plugin" in json.loads(put.body)["error"]["message"]
    listing = await http_client.fetch(url + "/keys?filter=a*", raise_error=False)
    assert listing.code == 400
    assert "'filter' plugin" in json.loads(listing.body)["error"]["message"]
    metrics = await http_client.fetch(url + "/metrics", raise_error=False)
    assert metrics.code == 404
    assert "'metrics' plugin" in json.loads(metrics.body)["error"]["message"]
    assert bare.journal_lines() == []


# --- settings ---------------------------------------------------------------------------


def _make_plugins(toml: str = "", environ: dict[str, str] | None = None, *, tmp_path):  # noqa: ANN001, ANN202
    from kvd.config import load_config
    from kvd.plugins import make_plugin_manager

    file = tmp_path / "kvd.toml"
    file.write_text(toml)
    return make_plugin_manager(load_config(file, environ=environ or {}))


@pytest.mark.parametrize("setting, value, said", [
    ("sweep_interval", '"fast"', "plugins.expiry.sweep_interval must be a positive number of seconds up to 60, not 'fast'"),
    ("sweep_interval", "true", "plugins.expiry.sweep_interval must be a positive number"),  # not 1 second
    ("sweep_interval", "nan", "plugins.expiry.sweep_interval must be a positive number"),
    ("sweep_interval", "inf", "plugins.expiry.sweep_interval must be a positive number"),
    ("sweep_interval", "0", "plugins.expiry.sweep_interval must be a positive number"),
    ("sweep_interval", "61", "plugins.expiry.sweep_interval must be a positive number of seconds up to 60"),
    ("sweep_interval", "[1]", "plugins.expiry.sweep_interval must be a positive number"),
    ("sweep_batch", "1.5", "plugins.expiry.sweep_batch must be a positive integer, not 1.5"),
    ("sweep_batch", "2.0", "plugins.expiry.sweep_batch must be a positive integer"),
    ("sweep_batch", "true", "plugins.expiry.sweep_batch must be a positive integer, not True"),
    ("sweep_batch", '"10"', "plugins.expiry.sweep_batch must be a positive integer"),
    ("sweep_batch", "0", "plugins.expiry.sweep_batch must be a positive integer"),
])
def test_expiry_settings_of_the_wrong_type_or_range_are_refused_naming_them(tmp_path, setting, value, said):
    from kvd.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        _make_plugins(f"[plugins.expiry]\n{setting} = {value}\n", tmp_path=tmp_path)
    assert str(raised.value) == said or str(raised.value).startswith(said)
    assert "not supported between" not in str(raised.value)
    variable = f"KVD_PLUGINS_EXPIRY_{setting.upper()}"
    with pytest.raises(ConfigError, match=re.escape(said)):
        _make_plugins(environ={variable: value}, tmp_path=tmp_path)


@pytest.mark.parametrize("setting, text", [("sweep_interval", "abc"), ("sweep_interval", "NaN"),
                                           ("sweep_batch", "1.5"), ("sweep_batch", "many")])
def test_cli_a_bad_expiry_setting_from_the_environment_exits_2_naming_its_variable(
        tmp_path, capsys, monkeypatch, setting, text):
    from kvd import cli

    def refuse_to_serve(coroutine):  # noqa: ANN001, ANN202
        coroutine.close()
        raise AssertionError("kvd serve went on to start the server")

    variable = f"KVD_PLUGINS_EXPIRY_{setting.upper()}"
    monkeypatch.setattr(cli, "_run", refuse_to_serve)
    monkeypatch.setenv(variable, text)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert f"kvd: error: plugins.expiry.{setting} must be a positive" in err
    assert f"(set by the environment variable {variable})" in err
    assert not (tmp_path / "d").exists()


def test_expiry_settings_take_ints_floats_and_environment_numbers(tmp_path):
    plugins = _make_plugins("[plugins.expiry]\nsweep_interval = 1\nsweep_batch = 5\n", tmp_path=tmp_path)
    expiry = plugins.get_plugin("expiry")
    assert (expiry.sweep_interval, expiry.sweep_batch) == (1.0, 5)
    plugins = _make_plugins(environ={"KVD_PLUGINS_EXPIRY_SWEEP_INTERVAL": "0.25",
                                     "KVD_PLUGINS_EXPIRY_SWEEP_BATCH": "7"}, tmp_path=tmp_path)
    expiry = plugins.get_plugin("expiry")
    assert (expiry.sweep_interval, expiry.sweep_batch) == (0.25, 7)
