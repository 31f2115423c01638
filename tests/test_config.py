"""Settings: defaults, file, environment, flags, and exit 2 on anything wrong."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO

from kvd.config import ConfigError, JournalConfig, load_config
from kvd.log.file import FileJournal
from kvd.log.format import GENESIS_HASH, encode_record


def test_defaults_match_the_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/kvd.toml here
    config = load_config(None, environ={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)
    assert config.journal.data_dir == "data"
    assert config.journal.fsync == "always"
    assert config.plugins.enabled == ["expiry", "metrics", "filter"]
    assert config.server.max_body_bytes == 4 * 1024 * 1024
    assert config.server.max_value_bytes == 1024 * 1024
    assert config.source is None


def test_shipped_config_file_holds_exactly_the_defaults(tmp_path, monkeypatch):
    shipped = load_config(REPO / "config" / "kvd.toml", environ={})
    monkeypatch.chdir(tmp_path)
    defaults = load_config(None, environ={})
    assert shipped.server == defaults.server
    assert shipped.journal == defaults.journal
    assert shipped.plugins == defaults.plugins


def test_the_journal_and_the_config_agree_on_the_segment_size():
    """FileJournal keeps its own default (kvd/log/file.py does not import the config): they must not drift."""
    journal_default = inspect.signature(FileJournal).parameters["segment_bytes"].default
    assert journal_default == JournalConfig.segment_bytes == 16 * 1024 * 1024


def test_default_config_file_is_used_when_present(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "kvd.toml").write_text("[server]\nport = 9001\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    assert config.server.port == 9001
    assert config.source == "config/kvd.toml"


def test_precedence_flags_over_environment_over_file(tmp_path):
    file = tmp_path / "kvd.toml"
    file.write_text('[server]\nport = 1111\nhost = "0.0.0.0"\n[journal]\nfsync = "no"\n')
    environ = {"KVD_SERVER_PORT": "2222", "KVD_JOURNAL_FSYNC": "everysec"}
    config = load_config(file, environ=environ, overrides={"server.port": 3333})
    assert config.server.port == 3333  # flag
    assert config.journal.fsync == "everysec"  # environment
    assert config.server.host == "0.0.0.0"  # file


@pytest.mark.parametrize("toml, environ, overrides, said, where", [
    ('[server]\nport = "abc"\n', {}, {"server.port": 0},
     "setting 'server.port' must be int, not 'abc'", "(set in the config file {file})"),
    ("[server]\nport = 70000\n", {"KVD_SERVER_PORT": "1"}, {},
     "server.port must be 0-65535", "(set in the config file {file})"),
    ('[journal]\nfsync = "sometimes"\n', {}, {"journal.fsync": "no"},
     "journal.fsync must be one of", "(set in the config file {file})"),
    ("[server]\nidle_timeout = nan\n", {"KVD_SERVER_IDLE_TIMEOUT": "5"}, {},
     "'server.idle_timeout' must be a finite number", "(set in the config file {file})"),
    ("", {"KVD_SERVER_PORT": "abc"}, {"server.port": 0},
     "setting 'server.port' must be int, not 'abc'", "(set by the environment variable KVD_SERVER_PORT)"),
    ("", {"KVD_JOURNAL_FSYNC": "never"}, {"journal.fsync": "always"},
     "journal.fsync must be one of", "(set by the environment variable KVD_JOURNAL_FSYNC)"),
    ("", {"KVD_SERVER_DRAIN_SECONDS": "-1"}, {},
     "server.drain_seconds must not be negative", "(set by the environment variable KVD_SERVER_DRAIN_SECONDS)"),
    ("", {}, {"journal.data_dir": ""}, "journal.data_dir must not be empty", "(set on the command line)"),
])
def test_an_invalid_value_is_an_error_even_when_a_later_layer_overrides_it(
        tmp_path, toml, environ, overrides, said, where):
    """SPEC 6: invalid settings stop start-up. Flags used to be applied before anything was
    checked, so --port 0 hid a port = "abc" in the file or in KVD_SERVER_PORT."""
    file = tmp_path / "kvd.toml"
    file.write_text(toml)
    with pytest.raises(ConfigError) as raised:
        load_config(file, environ=environ, overrides=overrides)
    message = str(raised.value)
    assert said in message and message.endswith(where.format(file=file))
    assert message.count("(set ") == 1


def test_a_pair_of_settings_may_come_from_different_layers(tmp_path):
    """Each layer is checked on its own, but only the merged settings must hold together."""
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    file = tmp_path / "kvd.toml"
    file.write_text(f'[server]\ncertfile = "{tmp_path / "cert.pem"}"\n')
    config = load_config(file, environ={"KVD_SERVER_KEYFILE": str(tmp_path / "key.pem")})
    assert (config.server.certfile, config.server.keyfile) == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    with pytest.raises(ConfigError, match="certfile and server.keyfile must be given together"):
        load_config(file, environ={})


@pytest.mark.parametrize("toml, environ, said", [
    ('[server]\nport = "abc"\n', {}, "setting 'server.port' must be int, not 'abc' (set in the config file kvd.toml)"),
    ("", {"KVD_SERVER_PORT": "abc"},
     "setting 'server.port' must be int, not 'abc' (set by the environment variable KVD_SERVER_PORT)"),
])
def test_cli_a_bad_port_is_an_error_even_with_the_port_flag(tmp_path, capsys, monkeypatch, toml, environ, said):
    from kvd import cli

    monkeypatch.setattr(cli, "_run", refuse_to_serve)
    monkeypatch.chdir(tmp_path)
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    (tmp_path / "kvd.toml").write_text(toml)
    assert cli.main(["serve", "--config", "kvd.toml", "--port", "0", "--data-dir", "d"]) == 2
    assert capsys.readouterr().err == f"kvd: error: {said}\n"
    assert not (tmp_path / "d").exists()


def test_environment_lists_and_booleans_are_parsed():
    config = load_config(None, environ={
        "KVD_PLUGINS_ENABLED": "expiry, filter", "KVD_JOURNAL_ARCHIVE": "true",
        "KVD_JOURNAL_NATS_SERVERS": "nats://a:1,nats://b:2", "KVD_TEST_THING": "ignored",
    })
    assert config.plugins.enabled == ["expiry", "filter"]
    assert config.journal.archive is True
    assert config.journal.nats.servers == ["nats://a:1", "nats://b:2"]


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[server]\nprot = 1\n", "server.prot"),
        ("[sever]\nport = 1\n", "sever"),
        ('[server]\nport = "x"\n', "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        ('[journal]\nfsync = "sometimes"\n', "journal.fsync"),
        ('[journal]\nbackend = "s3"\n', "journal.backend"),
        ("[journal]\narchive = 3\n", "journal.archive"),
        ("[journal.nats]\nstreem = 'X'\n", "journal.nats.streem"),
        ('[plugins]\nenabled = "expiry"\n', "plugins.enabled"),
        ("[plugins.expiry]\nsweep_intervall = 1\n", "sweep_intervall"),
        ("[server\n", "not valid TOML"),
        ("server = 5\n", "setting 'server' must be a table"),
        ("journal = 5\n", "setting 'journal' must be a table"),
        ('plugins = "ab"\n', "setting 'plugins' must be a table"),
        ("[journal]\nnats = 1\n", "setting 'journal.nats' must be a table"),
    ],
)
def test_bad_settings_raise_naming_the_setting(tmp_path, toml, named):
    file = tmp_path / "kvd.toml"
    file.write_text(toml)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config = load_config(file, environ={})
        from kvd.plugins import make_plugin_manager

        make_plugin_manager(config)


def _float_settings() -> list[str]:
    """Every float-typed setting, found from the dataclasses so a new one is covered too."""
    from dataclasses import fields
    from typing import get_type_hints

    from kvd.config import NatsConfig, ServerConfig

    names = []
    for section, cls in (("server", ServerConfig), ("journal", JournalConfig), ("journal.nats", NatsConfig)):
        hints = get_type_hints(cls)
        names += [f"{section}.{f.name}" for f in fields(cls) if hints[f.name] is float]
    return names


def test_every_float_setting_is_found():
    assert {"server.idle_timeout", "server.body_timeout", "server.drain_seconds",
            "journal.compact_dead_ratio", "journal.compact_check_seconds",
            "journal.nats.publish_timeout"} <= set(_float_settings())


@pytest.mark.parametrize("dotted", _float_settings())
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "+nan"])
def test_nan_and_infinity_are_refused_for_every_float_setting(tmp_path, dotted, text):
    """NaN passes every comparison check (nan <= 0 is False); NaN and infinity then break
    the server later (idle_timeout = nan killed every connection with a ValueError)."""
    section, name = dotted.rsplit(".", 1)
    file = tmp_path / "kvd.toml"
    file.write_text(f"[{section}]\n{name} = {text}\n")
    with pytest.raises(ConfigError, match=rf"'{re.escape(dotted)}' must be a finite number"):
        load_config(file, environ={})
    variable = "KVD_" + dotted.upper().replace(".", "_")
    with pytest.raises(ConfigError, match=rf"'{re.escape(dotted)}' must be a finite number"):
        load_config(None, environ={variable: text})
    variable_text = {"nan": "NaN", "inf": "Infinity", "-inf": "-infinity", "+nan": "nan"}[text]
    with pytest.raises(ConfigError, match=rf"'{re.escape(dotted)}' must be a finite number"):
        load_config(None, environ={variable: variable_text})  # float() also reads these spellings


def refuse_to_serve(coroutine) -> int:  # noqa: ANN001
    coroutine.close()
    raise AssertionError("kvd serve went on to start the server")


def test_cli_nan_idle_timeout_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    from kvd import cli
    from kvd.cli import main

    monkeypatch.setattr(cli, "_run", refuse_to_serve)
    (tmp_path / "kvd.toml").write_text("[server]\nidle_timeout = nan\n")
    assert main(["serve", "--config", str(tmp_path / "kvd.toml"), "--data-dir", str(tmp_path / "d")]) == 2
    assert "server.idle_timeout' must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing started


def test_unknown_environment_setting_is_an_error():
    with pytest.raises(ConfigError, match="KVD_SERVER_PROT"):
        load_config(None, environ={"KVD_SERVER_PROT": "1"})


def run_kvd(*args: str, cwd, env=None) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    return subprocess.run(
        [sys.executable, "-m", "kvd", *args], capture_output=True, text=True, timeout=60,
        cwd=cwd, env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_cli_missing_config_file_exits_2_naming_it(tmp_path):
    result = run_kvd("serve", "--config", "missing.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "missing.toml" in result.stderr


def test_cli_invalid_setting_exits_2_naming_it(tmp_path):
    result = run_kvd("serve", "--port", "0", cwd=tmp_path, env={"KVD_JOURNAL_FSYNC": "never"})
    assert result.returncode == 2
    assert "journal.fsync" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing started, nothing created


def test_cli_usage_error_exits_2(tmp_path):
    result = run_kvd("serve", "--fsync", "sometimes", cwd=tmp_path)
    assert result.returncode == 2
    assert run_kvd("frobnicate", cwd=tmp_path).returncode == 2


def test_cli_plugins_lists_builtins_and_enabled_state(tmp_path):
    result = run_kvd("plugins", cwd=tmp_path, env={"KVD_PLUGINS_ENABLED": "filter"})
    assert result.returncode == 0, result.stderr
    states = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    # other installed plugins (entry points) may be listed too, all disabled
    assert {name: states[name] for name in ("expiry", "metrics", "filter")} == {
        "expiry": "disabled", "metrics": "disabled", "filter": "enabled"}
    assert set(states.values()) == {"enabled", "disabled"}


def test_plugin_settings_from_the_environment_are_read_as_toml_values():
    config = load_config(None, environ={"KVD_PLUGINS_EXPIRY_SWEEP_INTERVAL": "0.5",
                                        "KVD_PLUGINS_EXPIRY_SWEEP_BATCH": "10"})
    assert config.plugins.settings == {"expiry": {"sweep_interval": 0.5, "sweep_batch": 10}}


def test_unknown_environment_section_is_an_error_but_test_names_are_left_alone():
    with pytest.raises(ConfigError, match="KVD_SEVER_PORT"):
        load_config(None, environ={"KVD_SEVER_PORT": "1"})
    load_config(None, environ={"KVD_TEST_EXAMPLES": "5"})


def test_nats_backend_settings_are_checked():
    config = load_config(None, environ={
        "KVD_JOURNAL_BACKEND": "nats", "KVD_JOURNAL_NATS_REPLICAS": "3",
        "KVD_JOURNAL_NATS_STREAM": "orders-1",
    })
    assert (config.journal.backend, config.journal.nats.replicas) == ("nats", 3)
    for variable, value in (
        ("KVD_JOURNAL_NATS_REPLICAS", "2"), ("KVD_JOURNAL_NATS_STREAM", "a.b"),
        ("KVD_JOURNAL_NATS_PUBLISH_TIMEOUT", "0"),
    ):
        with pytest.raises(ConfigError, match=variable.removeprefix("KVD_").lower().replace("_nats_", ".nats.")):
            load_config(None, environ={"KVD_JOURNAL_BACKEND": "nats", variable: value})


def test_cli_port_in_use_exits_1_with_a_message(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_kvd("serve", "--port", str(port), "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("data_dir", ["a-file", "a-file/sub"])
def test_cli_data_dir_that_cannot_be_used_exits_1_with_a_message(tmp_path, data_dir):
    (tmp_path / "a-file").write_text("not a directory")
    result = run_kvd("serve", "--port", "0", "--data-dir", str(tmp_path / data_dir), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot use data directory {tmp_path / data_dir}" in result.stderr
    assert "Traceback" not in result.stderr


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run kvd as another user")
@pytest.mark.parametrize("owned_by_root", ["directory", "segment"])
def test_cli_data_the_user_cannot_write_exits_1_naming_the_file(owned_by_root):
    """The Docker image runs as an unprivileged user; a root-owned bind mount (or a segment
    left by a run as root) must say which file, not print a traceback."""
    with tempfile.TemporaryDirectory() as outside:  # pytest's tmp_path is closed to other users
        check_data_the_user_cannot_write(Path(outside), owned_by_root)


def check_data_the_user_cannot_write(tmp_path: Path, owned_by_root: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    segment = data_dir / "00000000000000000001.jsonl"
    line, _ = encode_record(seq=1, ts="2026-11-27T00:00:00.000000Z", op="put", prev=GENESIS_HASH,
                            set_values={"k": b"1"})
    segment.write_bytes(line)
    tmp_path.chmod(0o755)
    if owned_by_root == "segment":
        os.chown(data_dir, NOBODY, NOBODY)
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-m", "kvd", "serve", "--port", "0", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, cwd=data_dir, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1, result.stderr
    blamed = data_dir / "LOCK" if owned_by_root == "directory" else segment
    assert f"Permission denied: '{blamed}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert segment.read_bytes() == line


def test_start_up_names_the_plugins_and_warns_of_settings_for_one_not_enabled(kvd_process, tmp_path):
    """Tokens written for an auth plugin left out of ``enabled`` protect nothing: say so."""
    config = tmp_path / "forgot.toml"
    config.write_text(
        '[plugins]\nenabled = ["expiry", "metrics"]\n'
        '[plugins.auth]\ntokens = [{ name = "ci", sha256 = "' + "0" * 64 + '", scopes = ["read"] }]\n'
    )
    server = kvd_process(args=["--config", str(config)])
    assert "plugins: expiry, metrics" in server.log()
    assert re.search(r"WARNING .*\[plugins\.auth\] settings are ignored: 'auth' is not in "
                     r"plugins\.enabled \(requests are served without tokens\)", server.log())
    assert server.request("PUT", "/keys/open", 1).status == 201  # what the warning is about


def test_start_up_warns_of_nothing_when_every_configured_plugin_is_enabled(kvd_process, tmp_path):
    config = tmp_path / "kvd.toml"
    config.write_text('[plugins]\nenabled = ["expiry"]\n[plugins.expiry]\nsweep_interval = 0.5\n')
    server = kvd_process(args=["--config", str(config)])
    assert "plugins: expiry" in server.log() and "WARNING" not in server.log()


@pytest.mark.parametrize("variables, said", [
    ({"KVD_JOURNAL_FSYNC": "maybe"}, "journal.fsync must be one of"),
    ({"KVD_SERVER_PORT": "abc"}, "setting 'server.port' must be int"),
    ({"KVD_PLUGINS_ENABLED": "auth", "KVD_PLUGINS_AUTH_TOKENS": "[]"}, "plugins.auth.tokens must be"),
])
def test_cli_a_bad_value_from_the_environment_names_its_variable(tmp_path, variables, said):
    """The operator would otherwise look for the bad value in the config file."""
    result = run_kvd("serve", "--data-dir", str(tmp_path / "d"), cwd=tmp_path, env=variables)
    assert result.returncode == 2
    variable = list(variables)[-1]
    assert said in result.stderr and f"(set by the environment variable {variable})" in result.stderr


def test_cli_a_bad_value_from_the_file_names_no_variable(tmp_path):
    (tmp_path / "kvd.toml").write_text('[journal]\nfsync = "maybe"\n')
    result = run_kvd("serve", "--config", "kvd.toml", cwd=tmp_path, env={"KVD_SERVER_PORT": "0"})
    assert result.returncode == 2
    assert "journal.fsync must be one of" in result.stderr and "environment" not in result.stderr


def test_cli_plugin_that_fails_to_import_exits_2(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("def oops(:\n")
    result = run_kvd("plugins", cwd=tmp_path, env={"KVD_PLUGINS_ENABLED": "broken_plugin",
                                                    "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    assert "broken_plugin" in result.stderr and "SyntaxError" in result.stderr


def test_misspelt_plugin_in_an_environment_setting_is_an_error():
    with pytest.raises(ConfigError, match="KVD_PLUGINS_EXPRIY_SWEEP_INTERVAL"):
        load_config(None, environ={"KVD_PLUGINS_EXPRIY_SWEEP_INTERVAL": "0.5"})


def test_environment_setting_of_a_plugin_with_underscores_in_its_name():
    config = load_config(None, environ={
        "KVD_PLUGINS_ENABLED": "filter,kvd_readonly_keys",
        "KVD_PLUGINS_KVD_READONLY_KEYS_PATTERNS": '["config/*"]',
    })
    assert config.plugins.settings == {"kvd_readonly_keys": {"patterns": ["config/*"]}}


def test_builtin_plugin_names_agree_with_the_resolver():
    from kvd.config import BUILTIN_PLUGINS
    from kvd.plugins import BUILTINS

    assert set(BUILTIN_PLUGINS) == set(BUILTINS)
