"""Settings: defaults, then the TOML file, then ``KVD_<SECTION>_<NAME>``, then flags.

Every setting is a typed dataclass field; anything unknown or of the wrong
type raises ConfigError naming it, and the command line exits 2. Each layer
is checked on its own before they are merged, so a bad value is an error
even where a later layer overrides it, and the message says which layer set it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_CONFIG_PATH = Path("config/kvd.toml")
FSYNC_POLICIES = ("always", "everysec", "no")
BACKENDS = ("file", "nats")
ENV_PREFIX = "KVD_"
TEST_ENV_PREFIX = "KVD_TEST_"
BUILTIN_PLUGINS = ("expiry", "metrics", "filter", "auth")


class ConfigError(ValueError):
    """A setting is unknown or invalid; the message names it."""

    def __init__(self, message: str, *, located: bool = False) -> None:
        super().__init__(message)
        self.located = located
        """The message already says where the value came from: the file, a variable or a flag."""


_DOTTED_SETTING = re.compile(r"\b(?:server|journal|plugins)(?:\.[a-z0-9_]+)+")


def name_the_variable(message: str, environ: Mapping[str, str]) -> str:
    """``message`` plus the environment variable that set the setting it names, if one did:
    an operator otherwise looks for a bad value in the file, where it is not."""
    variable = _variable_named(message, environ)
    return f"{message} (set by the environment variable {variable})" if variable else message


def _variable_named(message: str, environ: Mapping[str, str]) -> str | None:
    for dotted in _DOTTED_SETTING.findall(message):
        variable = ENV_PREFIX + dotted.upper().replace(".", "_")
        if variable in environ:
            return variable
    return None


def positive_number(value: Any, name: str, *, unit: str = "", at_most: float | None = None) -> float:
    """A plugin's numeric setting: a finite int or float above 0 (and up to ``at_most``).

    ``name`` is the dotted setting (``plugins.expiry.sweep_interval``). A bool is not a
    number (TOML's ``true`` would otherwise pass as 1), nor is text: an environment
    value that is not a TOML number (``abc``) arrives as text. Raises ConfigError.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and math.isfinite(value) and value > 0 and (at_most is None or value <= at_most):
        return float(value)
    what = f"a positive number{f' of {unit}' if unit else ''}"
    if at_most is not None:
        what += f" up to {at_most:g}"
    raise ConfigError(f"{name} must be {what}, not {value!r}")


def positive_int(value: Any, name: str) -> int:
    """A plugin's count setting: an int of at least 1 (not a bool, a float or text). Raises ConfigError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"{name} must be a positive integer, not {value!r}")


class _EnvText(str):
    """A value from the environment: text that may stand for a number, bool or list."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    max_value_bytes: int = 1024 * 1024
    max_keys_per_request: int = 10_000
    max_header_bytes: int = 64 * 1024
    idle_timeout: float = 60.0  # also bounds how long a client may take to send headers
    body_timeout: float = 30.0
    drain_seconds: float = 30.0
    fast_wire: bool = True  # plain GET/HEAD/PUT/DELETE /keys/{id} on kvd's own connections (kvd.handlers.wire)
    certfile: str = ""  # PEM certificate (chain); with keyfile, serve HTTPS
    keyfile: str = ""


@dataclass(frozen=True)
class NatsConfig:
    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    stream: str = "KVD"
    replicas: int = 1  # the stream's replica count when kvd creates it (1, 3 or 5)
    publish_timeout: float = 5.0  # seconds a write waits for NATS before answering 503


@dataclass(frozen=True)
class JournalConfig:
    data_dir: str = "data"
    fsync: str = "always"
    segment_bytes: int = 16 * 1024 * 1024
    seal_segments: bool = True
    compact_dead_ratio: float = 1.0
    compact_min_dead_bytes: int = 16 * 1024 * 1024
    compact_check_seconds: float = 10.0
    archive: bool = False
    record_client: bool = False
    backend: str = "file"
    nats: NatsConfig = field(default_factory=NatsConfig)


@dataclass(frozen=True)
class PluginsConfig:
    enabled: list[str] = field(default_factory=lambda: ["expiry", "metrics", "filter"])
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each ``[plugins.<name>]`` table, passed to that plugin, which checks it."""


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    source: str | None = None
    """The file the settings came from, if any."""

    @property
    def data_dir(self) -> Path:
        return Path(self.journal.data_dir)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config: defaults < file < environment < ``overrides``.

    ``path`` None means ``config/kvd.toml`` when it exists. ``overrides`` maps
    dotted names (``"server.port"``) to values, for command-line flags.

    SPEC 6: an invalid setting stops start-up, so each layer is checked alone
    first (an error there says which layer: ``(set in the config file F)``,
    ``(set by the environment variable V)``, ``(set on the command line)``);
    settings that must agree with each other are checked once merged.
    Plugin tables are checked by the plugins, on the merged values only.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = None
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} not found")
    else:
        file = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None
    if file is not None:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(file)!r} is not valid TOML: {exc}") from None
        source = str(file)
        _check_layer(raw, lambda message: f"set in the config file {source}")
    from_environment = _environment_settings(environ, raw)

    def which_variable(message: str) -> str:
        variable = _variable_named(message, environ)
        return f"set by the environment variable {variable}" if variable else "set by the environment"

    _check_layer(_assigned(from_environment), which_variable)
    from_flags = [(dotted, value) for dotted, value in (overrides or {}).items() if value is not None]
    _check_layer(_assigned(from_flags), lambda message: "set on the command line")
    for dotted, value in from_environment + from_flags:
        _set_dotted(raw, dotted, value)
    config = _build(raw)
    return dataclasses.replace(config, source=source)


def _check_layer(raw: dict[str, Any], where: Callable[[str], str]) -> None:
    """Check one layer's values alone; ``where(message)`` says where an invalid one came from."""
    try:
        _build(raw, merged=False)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({where(str(exc))})", located=True) from None


def _assigned(assignments: list[tuple[str, Any]]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for dotted, value in assignments:
        _set_dotted(raw, dotted, value)
    return raw


def _build(raw: dict[str, Any], *, merged: bool = True) -> Config:
    """The Config from raw values; ``merged`` False for one layer alone, which skips
    the checks between settings (another layer may give the other of a pair)."""
    unknown = set(raw) - {"server", "journal", "plugins"}
    if unknown:
        raise ConfigError(f"unknown setting {sorted(unknown)[0]!r}")
    server = _section(ServerConfig, raw.get("server", {}), "server")
    journal_raw = dict(_table(raw.get("journal", {}), "journal"))
    nats = _section(NatsConfig, journal_raw.pop("nats", {}), "journal.nats")
    journal = _section(JournalConfig, journal_raw, "journal", nats=nats)
    plugins_raw = dict(_table(raw.get("plugins", {}), "plugins"))
    settings = {k: v for k, v in plugins_raw.items() if isinstance(v, dict)}
    for name in settings:
        plugins_raw.pop(name)
    plugins = _section(PluginsConfig, plugins_raw, "plugins", settings=settings)
    _check_values(server, journal, plugins)
    if merged and bool(server.certfile) != bool(server.keyfile):
        raise ConfigError("server.certfile and server.keyfile must be given together")
    return Config(server=server, journal=journal, plugins=plugins)


def _check_values(server: ServerConfig, journal: JournalConfig, plugins: PluginsConfig) -> None:
    if not 0 <= server.port <= 65535:
        raise ConfigError(f"server.port must be 0-65535, not {server.port}")
    for name in ("max_body_bytes", "max_value_bytes", "max_keys_per_request",
                 "max_header_bytes", "idle_timeout", "body_timeout"):
        if getattr(server, name) <= 0:
            raise ConfigError(f"server.{name} must be positive")
    for name in ("certfile", "keyfile"):
        path = getattr(server, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"server.{name}: no such file {path!r}")
    if server.drain_seconds < 0:
        raise ConfigError("server.drain_seconds must not be negative")
    if journal.fsync not in FSYNC_POLICIES:
        raise ConfigError(
            f"journal.fsync must be one of {', '.join(FSYNC_POLICIES)}, not {journal.fsync!r}"
        )
    if journal.backend not in BACKENDS:
        raise ConfigError(f"journal.backend must be one of {', '.join(BACKENDS)}")
    nats = journal.nats
    if not nats.servers or not all(isinstance(url, str) and url for url in nats.servers):
        raise ConfigError("journal.nats.servers must list at least one nats:// URL")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", nats.stream):
        raise ConfigError("journal.nats.stream must be 1-32 letters, digits, '-' or '_'")
    if nats.replicas not in (1, 3, 5):
        raise ConfigError("journal.nats.replicas must be 1, 3 or 5")
    if nats.publish_timeout <= 0:
        raise ConfigError("journal.nats.publish_timeout must be positive")
    if journal.segment_bytes < 4096:
        raise ConfigError("journal.segment_bytes must be at least 4096")
    for name in ("compact_dead_ratio", "compact_min_dead_bytes"):
        if getattr(journal, name) < 0:
            raise ConfigError(f"journal.{name} must not be negative")
    if journal.compact_check_seconds <= 0:
        raise ConfigError("journal.compact_check_seconds must be positive")
    if not journal.data_dir:
        raise ConfigError("journal.data_dir must not be empty")
    if len(set(plugins.enabled)) != len(plugins.enabled):
        raise ConfigError("plugins.enabled lists a plugin twice")


def _table(values: Any, name: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"setting {name!r} must be a table")
    return values


def _section(cls: type, values: Any, name: str, **fixed: Any) -> Any:
    _table(values, name)
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    kwargs: dict[str, Any] = dict(fixed)
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting '{name}.{key}'")
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check a TOML value (or an environment string) against the field's type."""
    text = isinstance(value, _EnvText)
    if hint is bool:
        if text and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, bool):
            return value
    elif hint is int:
        if text:
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if text:
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is not None:
            # TOML has nan and inf, float() reads "nan" and "Infinity": NaN passes every
            # range check below (nan <= 0 is False) and neither means a duration.
            if not math.isfinite(number):
                raise ConfigError(f"setting '{name}' must be a finite number, not {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return str(value)
    elif hint == list[str]:
        if text:
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
    kind = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"setting '{name}' must be {kind}, not {value!r}")


def _environment_settings(environ: Mapping[str, str], file: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every ``KVD_<SECTION>_<NAME>`` variable as (dotted setting, value); an unknown one is an error.

    ``KVD_PLUGINS_<PLUGIN>_<SETTING>`` sets ``[plugins.<plugin>] <setting>``,
    its value read as a TOML value when it is one (``0.5``, ``["a"]``), else
    as text; ``file`` (the file's settings) tells which plugins are known.
    Names under ``KVD_TEST_`` are left to the test suite.
    """
    settings: list[tuple[str, Any]] = []
    sections = {
        "SERVER_": ("server", ServerConfig),
        "JOURNAL_NATS_": ("journal.nats", NatsConfig),
        "JOURNAL_": ("journal", JournalConfig),
        "PLUGINS_": ("plugins", PluginsConfig),
    }
    for variable, value in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or variable.startswith(TEST_ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX) :]
        for prefix, (section, cls) in sections.items():
            if not rest.startswith(prefix):
                continue
            name = rest[len(prefix) :].lower()
            if name in {f.name for f in dataclasses.fields(cls)} - {"settings", "nats"}:
                settings.append((f"{section}.{name}", _EnvText(value)))
            elif section == "plugins" and "_" in name:
                plugin, setting = _split_plugin_setting(name, file, environ)
                settings.append((f"plugins.{plugin}.{setting}", _toml_value(value)))
            else:
                raise ConfigError(f"unknown setting {variable}")
            break
        else:
            raise ConfigError(f"unknown setting {variable}")
    return settings


def _split_plugin_setting(name: str, raw: dict[str, Any], environ: Mapping[str, str]) -> tuple[str, str]:
    """``expiry_sweep_interval`` -> (``expiry``, ``sweep_interval``) for a known plugin.

    Known: built-ins, plugins with a table in the file, and those enabled in
    the file or by ``KVD_PLUGINS_ENABLED``. Anything else is a misspelling.
    """
    plugins = raw.get("plugins", {})
    enabled = plugins.get("enabled", [])
    from_env = environ.get(f"{ENV_PREFIX}PLUGINS_ENABLED", "")
    known = (
        set(BUILTIN_PLUGINS)
        | {table for table, value in plugins.items() if isinstance(value, dict)}
        | {item for item in enabled if isinstance(item, str)}
        | {item.strip() for item in from_env.split(",") if item.strip()}
    )
    for plugin in sorted(known, key=len, reverse=True):
        if name.startswith(plugin.lower() + "_"):
            return plugin, name[len(plugin) + 1 :]
    raise ConfigError(
        f"unknown setting {ENV_PREFIX}PLUGINS_{name.upper()}: no known plugin's name starts it"
    )


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {part!r} must be a table")
    node[leaf] = value
