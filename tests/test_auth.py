"""The ``auth`` plugin: bearer tokens, scopes, the actor in the journal, ``kvd token new``."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import build_harness
from tornado.httpclient import HTTPResponse
from tornado.httputil import HTTPHeaders

from kvd.config import ConfigError, load_config
from kvd.plugins import make_plugin_manager

PLUGINS = ["expiry", "metrics", "filter", "auth"]

# Secrets made fresh per run, so that finding one anywhere is never a coincidence.
READER, WRITER, ADMIN = (secrets.token_urlsafe(32) for _ in range(3))
ALL_TOKENS = (READER, WRITER, ADMIN)


def entry(name: str, token: str, scopes: list[str]) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": scopes}


TOKENS = [
    entry("reader", READER, ["read"]),
    entry("ci", WRITER, ["read", "write"]),
    entry("ops", ADMIN, ["admin"]),
]


def auth_settings(**extra: Any) -> dict[str, Any]:
    return {"plugins.enabled": PLUGINS, "plugins.auth": {"tokens": TOKENS, **extra}}


@pytest.fixture
def plugin_settings() -> dict[str, Any]:
    return auth_settings()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    http_client: Any, url: str, method: str, path: str, token: str | None = None,
    body: Any = None, headers: dict[str, str] | HTTPHeaders | None = None,
) -> HTTPResponse:
    all_headers = HTTPHeaders(headers or {})
    if token is not None:
        all_headers.add("Authorization", f"Bearer {token}")
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    elif method in ("PUT", "PATCH"):
        payload = b""
    return await http_client.fetch(
        url + path, method=method, body=payload, headers=all_headers, raise_error=False,
        allow_nonstandard_methods=True,
    )


@pytest.fixture
def api(http_client, base_url):  # noqa: ANN001, ANN201
    async def send(method: str, path: str, token: str | None = None, body: Any = None,
                   headers: dict[str, str] | HTTPHeaders | None = None) -> HTTPResponse:
        return await call(http_client, base_url, method, path, token, body, headers)

    return send


def error(response: HTTPResponse) -> dict[str, str]:
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.body)["error"]


# --- 401: no valid token ----------------------------------------------------------------


@pytest.mark.gen_test
async def test_request_without_token_is_401_with_bearer_challenge_and_writes_nothing(api, harness):
    for method, path, body in [("GET", "/keys/a", None), ("GET", "/keys", None),
                               ("PUT", "/keys", {"a": 1}), ("PUT", "/keys/a", 1),
                               ("DELETE", "/keys", None), ("GET", "/metrics", None)]:
        response = await api(method, path, body=body)
        assert response.code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="kvd"'
        assert error(response)["code"] == "unauthorized"
    head = await api("HEAD", "/keys/a")
    assert head.code == 401 and head.body == b""
    assert head.headers["WWW-Authenticate"] == 'Bearer realm="kvd"'
    assert harness.journal_lines() == []
    assert len(harness.store) == 0


@pytest.mark.gen_test
async def test_unknown_token_is_401_invalid_token_and_writes_nothing(api, harness):
    wrong = secrets.token_urlsafe(32)
    for method, path, body in [("GET", "/keys/a", None), ("PUT", "/keys", {"a": 1})]:
        response = await api(method, path, wrong, body)
        assert response.code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="kvd", error="invalid_token"'
        assert wrong not in error(response)["message"]
    # A near miss (one character off a real token) is just as unknown.
    near = WRITER[:-1] + ("A" if WRITER[-1] != "A" else "B")
    assert (await api("PUT", "/keys", near, {"a": 1})).code == 401
    assert harness.journal_lines() == []


@pytest.mark.gen_test
@pytest.mark.parametrize("value", [
    f"Basic {WRITER}", "Bearer", "Bearer =abc", f"Bearer {WRITER} extra", f"Token {WRITER}",
    f"Bearer\t{WRITER}", f"{WRITER}", "Bearer tok\u00e9n",
])
async def test_malformed_authorization_header_is_401_with_challenge(api, harness, value):
    response = await api("PUT", "/keys", body={"a": 1}, headers={"Authorization": value})
    assert response.code == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="kvd"')
    assert error(response)["code"] == "unauthorized"
    assert WRITER not in response.body.decode()
    assert harness.journal_lines() == []


@pytest.mark.gen_test
async def test_two_authorization_headers_are_refused_even_if_one_is_valid(api, harness):
    headers = HTTPHeaders()
    headers.add("Authorization", f"Bearer {WRITER}")
    headers.add("Authorization", f"Bearer {READER}")
    response = await api("PUT", "/keys", body={"a": 1}, headers=headers)
    assert response.code == 401
    assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]
    assert harness.journal_lines() == []


@pytest.mark.gen_test
async def test_bearer_scheme_is_case_insensitive(api, harness):
    response = await api("PUT", "/keys", body={"a": 1}, headers={"Authorization": f"bearer {WRITER}"})
    assert response.code == 200
    assert [line["actor"] for line in harness.journal_lines()] == ["ci"]


# --- 403: known token, missing scope ------------------------------------------------------


@pytest.mark.gen_test
async def test_read_token_cannot_write_and_403_names_scope_and_token_name(api, harness):
    assert (await api("PUT", "/keys", WRITER, {"a": 1})).code == 200
    for method, path, body in [("PUT", "/keys", {"a": 2}), ("PUT", "/keys/a", 2),
                               ("PATCH", "/keys/a", {"x": 1}), ("DELETE", "/keys/a", None),
                               ("DELETE", "/keys", None)]:
        response = await api(method, path, READER, body)
        assert response.code == 403, (method, path)
        body_error = error(response)
        assert body_error["code"] == "forbidden"
        assert "'write'" in body_error["message"] and "'reader'" in body_error["message"]
        assert READER not in response.body.decode()
        assert response.headers["WWW-Authenticate"] == (
            'Bearer realm="kvd", error="insufficient_scope", scope="write"'
        )
    assert len(harness.journal_lines()) == 1  # only the writer's put
    assert (await api("GET", "/keys/a", READER)).body == b'{"a":1}'


@pytest.mark.gen_test
async def test_read_write_token_gets_403_on_metrics_which_needs_admin(api, harness):
    for token in (READER, WRITER):
        response = await api("GET", "/metrics", token)
        assert response.code == 403
        assert "'admin'" in error(response)["message"]
        assert (await api("HEAD", "/metrics", token)).code == 403  # HEAD shows no less
    assert (await api("GET", "/metrics", ADMIN)).code == 200
    assert (await api("HEAD", "/metrics", ADMIN)).code == 200


@pytest.mark.gen_test
async def test_head_of_the_journal_needs_admin_like_its_get(api, harness):
    for token in (READER, WRITER):
        assert (await api("HEAD", "/journal", token)).code == 403
    assert (await api("HEAD", "/journal", ADMIN)).code == 200


# --- 200: the scope is there --------------------------------------------------------------


@pytest.mark.gen_test
async def test_tokens_with_the_scope_get_through(api, harness):
    assert (await api("PUT", "/keys/a", WRITER, 1)).code == 201
    assert (await api("PATCH", "/keys/b", WRITER, {"x": 1})).code == 404  # authorized, absent
    assert (await api("GET", "/keys/a", READER)).code == 200
    assert (await api("HEAD", "/keys/a", READER)).code == 200
    assert (await api("GET", "/keys", READER)).body == b'{"a":1}'
    assert (await api("GET", "/keys/a", WRITER)).code == 200
    assert (await api("DELETE", "/keys/a", WRITER)).code == 204


@pytest.mark.gen_test
async def test_admin_scope_implies_read_and_write(api, harness):
    assert (await api("PUT", "/keys", ADMIN, {"a": 1})).code == 200
    assert (await api("GET", "/keys/a", ADMIN)).code == 200
    assert (await api("DELETE", "/keys", ADMIN)).code == 204
    assert (await api("GET", "/metrics", ADMIN)).code == 200
    assert [line["actor"] for line in harness.journal_lines()] == ["ops", "ops"]


@pytest.mark.gen_test
async def test_write_scope_alone_does_not_imply_read(http_client, served, tmp_path):
    writer_only = secrets.token_urlsafe(32)
    harness = build_harness(tmp_path / "d", **{"plugins.enabled": PLUGINS, "plugins.auth": {
        "tokens": [entry("loader", writer_only, ["write"])]}})
    url = served(harness)
    assert (await call(http_client, url, "PUT", "/keys", writer_only, {"a": 1})).code == 200
    assert (await call(http_client, url, "GET", "/keys/a", writer_only)).code == 403


# --- open routes --------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_healthz_and_readyz_are_open_without_a_token(api, harness):
    assert (await api("GET", "/healthz")).code == 200
    assert (await api("GET", "/readyz")).code == 200
    # Even a bad token does not matter there: the plugin is never asked.
    assert (await api("GET", "/healthz", "nonsense")).code == 200


# --- the actor ----------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_token_name_is_the_actor_of_each_write_it_makes(api, harness):
    assert (await api("PUT", "/keys", WRITER, {"a": 1, "b": 2})).code == 200
    assert (await api("PUT", "/keys/c", ADMIN, 3)).code == 201
    assert (await api("PATCH", "/keys/c", ADMIN, {"x": 1})).code == 200
    assert (await api("DELETE", "/keys/a", WRITER)).code == 204
    assert (await api("DELETE", "/keys", ADMIN)).code == 204
    assert (await api("PUT", "/keys", READER, {"z": 1})).code == 403
    lines = harness.journal_lines()
    assert [(line["op"], line["actor"]) for line in lines] == [
        ("put", "ci"), ("put", "ops"), ("put", "ops"), ("delete", "ci"), ("clear", "ops"),
    ]


@pytest.mark.gen_test
async def test_tokens_never_appear_in_journal_metrics_or_logs(api, harness, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = secrets.token_urlsafe(32)
    await api("PUT", "/keys", WRITER, {"a": 1})
    await api("PUT", "/keys", READER, {"a": 2})
    await api("PUT", "/keys", wrong, {"a": 3})
    await api("GET", "/keys/a", READER)
    await api("GET", "/metrics", WRITER)
    metrics = (await api("GET", "/metrics", ADMIN)).body.decode()
    journal = b"".join(path.read_bytes() for path in harness.data_dir.rglob("*") if path.is_file())
    for token in (*ALL_TOKENS, wrong):
        assert token not in metrics
        assert token.encode() not in journal
        assert token not in caplog.text
    assert b'"actor":"ci"' in journal


def console_blocks(text: str) -> list[list[str]]:
    """The lines of each ```console block in ``text``."""
    return [block.split("```", 1)[0].strip().splitlines() for block in text.split("```console\n")[1:]]


@pytest.mark.gen_test
async def test_who_changed_a_key_is_the_command_auth_md_shows_with_its_output(
        api, harness, capsysbinary):
    """docs/auth.md, "Where the actor shows up": the command shown runs and prints those lines."""
    from kvd.cli import main

    assert (await api("PUT", "/keys/config%2Fprice", WRITER, {"amount": 10, "currency": "EUR"})).code == 201
    assert (await api("DELETE", "/keys/config%2Fprice", ADMIN)).code == 204
    text = (Path(__file__).parent.parent / "docs" / "auth.md").read_text()
    section = text.split("## Where the actor shows up", 1)[1].split("\n## ", 1)[0]
    command, *shown = console_blocks(section)[0]
    assert command == "$ kvd journal history config/price --data-dir data"
    args = command.split()[2:]
    args[args.index("data")] = str(harness.data_dir)
    capsysbinary.readouterr()
    assert main(args) == 0
    ran = [json.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    documented = [json.loads(line) for line in shown]
    for line in ran + documented:
        del line["ts"]  # differs from run to run
    assert ran == documented == [
        {"seq": 1, "op": "put", "actor": "ci", "value": {"amount": 10, "currency": "EUR"}},
        {"seq": 2, "op": "delete", "actor": "ops"},
    ]


# --- configurable route scopes ------------------------------------------------------------


@pytest.mark.gen_test
async def test_metrics_scope_can_be_lowered_to_read(http_client, served, tmp_path):
    harness = build_harness(tmp_path / "d", **auth_settings(scopes={"/metrics": "read"}))
    url = served(harness)
    assert (await call(http_client, url, "GET", "/metrics", READER)).code == 200
    assert (await call(http_client, url, "GET", "/metrics")).code == 401
    # Overriding /metrics leaves the other routes at their defaults.
    assert (await call(http_client, url, "PUT", "/keys", READER, {"a": 1})).code == 403


@pytest.mark.gen_test
async def test_metrics_scope_none_opens_it_but_still_refuses_a_bad_token(http_client, served, tmp_path):
    harness = build_harness(tmp_path / "d", **auth_settings(scopes={"/metrics": "none"}))
    url = served(harness)
    assert (await call(http_client, url, "GET", "/metrics")).code == 200
    assert (await call(http_client, url, "GET", "/metrics", READER)).code == 200
    assert (await call(http_client, url, "GET", "/metrics", "mistyped")).code == 401
    assert (await call(http_client, url, "GET", "/keys")).code == 401


@pytest.mark.gen_test
async def test_scope_override_can_raise_a_route_to_admin(http_client, served, tmp_path):
    harness = build_harness(tmp_path / "d", **auth_settings(scopes={"/keys": "admin"}))
    url = served(harness)
    assert (await call(http_client, url, "GET", "/keys", WRITER)).code == 403
    assert (await call(http_client, url, "PUT", "/keys", WRITER, {"a": 1})).code == 403
    assert (await call(http_client, url, "PUT", "/keys", ADMIN, {"a": 1})).code == 200
    assert (await call(http_client, url, "GET", "/keys/a", READER)).code == 200  # /keys/{id} as before


def app_with_auth(tmp_path: Path, plugins: list[str] = PLUGINS, **auth: Any) -> Any:
    """Build the app as ``kvd serve`` does; the route table is only known then."""
    from kvd.handlers import make_app

    harness = build_harness(tmp_path / "d", **{"plugins.enabled": plugins,
                                               "plugins.auth": {"tokens": TOKENS, **auth}})
    try:
        return make_app(harness.ctx)
    finally:
        harness.ctx.stop_periodic_tasks()
        harness.journal.close_sync()


def test_scope_override_for_a_route_nobody_serves_is_refused_listing_the_routes(tmp_path):
    """A typo ("/key" for "/keys") used to be ignored: the route kept its default scope."""
    with pytest.raises(ConfigError) as caught:
        app_with_auth(tmp_path, scopes={"/metrics": "none", "/key": "none"})
    message = str(caught.value)
    assert message.startswith('plugins.auth.scopes."/key": no route /key is served')
    for route in ("/keys", "/keys/{id}", "/journal", "/journal/compact", "/metrics"):
        assert route in message


def test_scope_override_for_a_switched_off_plugins_route_is_refused(tmp_path):
    """/metrics exists only while the metrics plugin runs: the override would do nothing."""
    with pytest.raises(ConfigError, match=r'plugins\.auth\.scopes\."/metrics": no route /metrics') as caught:
        app_with_auth(tmp_path, ["expiry", "filter", "auth"], scopes={"/metrics": "none"})
    assert "/metrics," not in str(caught.value) and "enabled" in str(caught.value)


@pytest.mark.parametrize("route", ["/healthz", "/readyz", "/openapi.json"])
def test_scope_override_for_an_always_open_route_is_refused(tmp_path, route):
    with pytest.raises(ConfigError, match=rf'plugins\.auth\.scopes\."{route}": {route} is always open'):
        app_with_auth(tmp_path, scopes={route: "admin"})


def test_scope_override_for_a_route_a_plugin_adds_is_accepted(tmp_path):
    plugins = [*PLUGINS, "sample_plugins:ScopedRoute"]
    app = app_with_auth(tmp_path, plugins, scopes={"/scoped": "none", "/keys/{id}": "read"})
    assert app.ctx.plugins.get_plugin("auth").route_scopes == {"/scoped": "none", "/keys/{id}": "read"}


def test_cli_scope_override_for_an_unknown_route_exits_2_before_anything_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvd", "serve", "--port", "0", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "KVD_PLUGINS_ENABLED": "metrics,auth",
             "KVD_PLUGINS_AUTH_TOKENS": f'[{{ name = "ci", sha256 = "{GOOD["sha256"]}", scopes = ["read"] }}]',
             "KVD_PLUGINS_AUTH_SCOPES": '{ "/metrics" = "none", "/key" = "none" }'},
    )
    assert result.returncode == 2, result.stderr
    assert 'kvd: error: plugins.auth.scopes."/key": no route /key is served' in result.stderr
    assert "(set by the environment variable KVD_PLUGINS_AUTH_SCOPES)" in result.stderr
    assert "listening" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # checked before the data directory is locked


@pytest.mark.gen_test
async def test_open_route_records_a_valid_token_as_actor_and_none_without(http_client, served, tmp_path):
    harness = build_harness(tmp_path / "d", **auth_settings(scopes={"/keys/{id}": "none"}))
    url = served(harness)
    assert (await call(http_client, url, "PUT", "/keys/a", None, 1)).code == 201
    assert (await call(http_client, url, "PUT", "/keys/b", READER, 2)).code == 201
    assert [line.get("actor") for line in harness.journal_lines()] == [None, "reader"]


@pytest.mark.gen_test
async def test_realm_setting_appears_in_the_challenge(http_client, served, tmp_path):
    harness = build_harness(tmp_path / "d", **auth_settings(realm="store-eu"))
    url = served(harness)
    response = await call(http_client, url, "GET", "/keys")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="store-eu"'


def test_presented_token_is_compared_with_every_digest(monkeypatch):
    from kvd.plugins import auth

    plugin = auth.make_plugin({"tokens": TOKENS})
    compared: list[bytes] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert plugin.identify(READER).name == "reader"  # the first token matches...
    assert len(compared) == len(TOKENS)  # ...and every other digest is still compared
    compared.clear()
    assert plugin.identify("unknown") is None
    assert len(compared) == len(TOKENS)


# --- bad settings -------------------------------------------------------------------------


GOOD = entry("ci", WRITER, ["read"])


@pytest.mark.parametrize(("settings", "named"), [
    ({}, "plugins.auth.tokens"),
    ({"tokens": []}, "plugins.auth.tokens"),
    ({"tokens": [GOOD], "tokenz": 1}, "plugins.auth.tokenz"),
    ({"tokens": ["ci"]}, r"plugins.auth.tokens\[0\]"),
    ({"tokens": [{**GOOD, "name": ""}]}, r"plugins.auth.tokens\[0\].name"),
    ({"tokens": [GOOD, {**entry("ci", READER, ["read"])}]}, r"tokens\[1\] \(token 'ci'\): name is used"),
    ({"tokens": [{**GOOD, "sha256": GOOD["sha256"].upper()}]}, r"tokens\[0\] \(token 'ci'\).sha256"),
    ({"tokens": [{**GOOD, "sha256": GOOD["sha256"][:63]}]}, r"tokens\[0\] \(token 'ci'\).sha256"),
    ({"tokens": [GOOD, {**GOOD, "name": "twin"}]}, r"tokens\[1\] \(token 'twin'\).sha256"),
    ({"tokens": [{**GOOD, "scopes": ["read", "root"]}]}, r"tokens\[0\] \(token 'ci'\).scopes: unknown scope 'root'"),
    ({"tokens": [{**GOOD, "scopes": []}]}, r"tokens\[0\] \(token 'ci'\).scopes"),
    ({"tokens": [{**GOOD, "scopes": "read"}]}, r"tokens\[0\] \(token 'ci'\).scopes"),
    ({"tokens": [{**GOOD, "secret": "x"}]}, r"tokens\[0\] \(token 'ci'\): unknown setting 'secret'"),
    ({"tokens": [GOOD], "scopes": {"/metrics": "root"}}, 'plugins.auth.scopes."/metrics"'),
    ({"tokens": [GOOD], "scopes": {"metrics": "read"}}, 'plugins.auth.scopes."metrics"'),
    ({"tokens": [GOOD], "scopes": {"/healthz": "admin"}}, "always open"),
    ({"tokens": [GOOD], "scopes": ["/metrics"]}, "plugins.auth.scopes"),
    ({"tokens": [GOOD], "realm": 'a"b'}, "plugins.auth.realm"),
    ({"tokens": [GOOD], "realm": ""}, "plugins.auth.realm"),
])
def test_bad_auth_settings_are_config_errors_naming_the_setting(settings, named):
    config = load_config(None, environ={}, overrides={"plugins.enabled": PLUGINS,
                                                       "plugins.auth": settings})
    with pytest.raises(ConfigError, match=named):
        make_plugin_manager(config)


def test_token_pasted_as_sha256_is_refused_without_echoing_it():
    config = load_config(None, environ={}, overrides={"plugins.enabled": PLUGINS, "plugins.auth": {
        "tokens": [{"name": "ci", "sha256": WRITER, "scopes": ["read"]}]}})
    with pytest.raises(ConfigError) as caught:
        make_plugin_manager(config)
    assert "sha256" in str(caught.value) and WRITER not in str(caught.value)


# --- real processes -----------------------------------------------------------------------


def run_kvd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvd", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_bad_auth_settings_exit_2_naming_the_setting(tmp_path):
    config = tmp_path / "kvd.toml"
    config.write_text(
        '[plugins]\nenabled = ["metrics", "auth"]\n\n[plugins.auth]\n'
        'tokens = [{ name = "ci", sha256 = "abc", scopes = ["read"] }]\n'
    )
    result = run_kvd("serve", "--port", "0", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "plugins.auth.tokens[0] (token 'ci').sha256" in result.stderr
    assert not (tmp_path / "data").exists()


def test_token_new_rejects_an_unknown_scope_with_exit_2(tmp_path):
    result = run_kvd("token", "new", "ci", "--scope", "read,root", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown scope 'root'" in result.stderr
    assert result.stdout == ""  # no token printed


def test_token_new_output_configures_a_server_that_accepts_it(kvd_process, tmp_path):
    made = run_kvd("token", "new", "deploy bot", "--scope", "write, read", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    token, line = made.stdout.splitlines()
    config = tmp_path / "kvd.toml"
    config.write_text(f'[plugins]\nenabled = {json.dumps(PLUGINS)}\n\n[plugins.auth]\ntokens = [{line}]\n')
    import tomllib

    (parsed,) = tomllib.loads(config.read_text())["plugins"]["auth"]["tokens"]
    assert parsed == {"name": "deploy bot", "sha256": hashlib.sha256(token.encode()).hexdigest(),
                      "scopes": ["read", "write"]}

    server = kvd_process(args=["--config", str(config), "--access-log", "--log-level", "debug"])
    denied = server.request("PUT", "/keys", {"a": 1})
    assert denied.status == 401 and denied.headers["WWW-Authenticate"] == 'Bearer realm="kvd"'
    assert server.request("PUT", "/keys", {"a": 1}, headers=bearer(token)).status == 200
    assert server.request("GET", "/keys/a", headers=bearer(token)).json() == {"a": 1}
    assert server.request("GET", "/keys/a", headers=bearer(token + "x")).status == 401
    assert server.request("GET", "/metrics", headers=bearer(token)).status == 403
    assert server.request("GET", "/healthz").status == 200
    assert server.kill(15) == 0

    journal = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    records = [json.loads(raw) for raw in journal.splitlines() if raw.startswith(b"{")]
    assert [record.get("actor") for record in records if record.get("op") == "put"] == ["deploy bot"]
    assert token.encode() not in journal
    assert token not in server.log()


def test_auth_settings_can_come_from_the_environment():
    environ = {
        "KVD_PLUGINS_ENABLED": ",".join(PLUGINS),
        "KVD_PLUGINS_AUTH_TOKENS": f'[{{ name = "ci", sha256 = "{GOOD["sha256"]}", scopes = ["read"] }}]',
        "KVD_PLUGINS_AUTH_SCOPES": '{ "/metrics" = "none" }',
    }
    plugin = make_plugin_manager(load_config(None, environ=environ)).get_plugin("auth")
    assert [token.name for token in plugin.tokens] == ["ci"]
    assert plugin.identify(WRITER).name == "ci"
    assert plugin.route_scopes == {"/metrics": "none"}
