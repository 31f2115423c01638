"""Finding plugins and building a plugin manager per app.

Built-ins and third-party plugins go through the same ``resolve_plugin``: a
short name (a built-in, or an installed entry point in group ``kvd``) or a
dotted module path (``package.module`` or ``package.module:attribute``).
A module that defines ``make_plugin(settings)`` gets its ``[plugins.<name>]``
table and returns the object to register, so each app has its own plugin
state; a class without it is instantiated; any other module or object is
registered as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import pluggy

from kvd import hookspecs
from kvd.config import Config, ConfigError

ENTRY_POINT_GROUP = "kvd"
BUILTINS = {  # keys are config.BUILTIN_PLUGINS (config may not import this module)
    "expiry": "kvd.plugins.expiry",
    "metrics": "kvd.plugins.metrics",
    "filter": "kvd.plugins.filter",
    "auth": "kvd.plugins.auth",
}


def available_plugins() -> dict[str, str]:
    """Every plugin findable by short name, mapped to where it comes from."""
    found = dict(BUILTINS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
    return found


def resolve_plugin(name: str) -> Any:
    """Turn a short name, entry point name or dotted path into a loaded object."""
    if name in BUILTINS:
        return importlib.import_module(BUILTINS[name])
    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            return entry.load()
        except Exception as exc:  # ImportError, SyntaxError, ... inside the plugin
            raise ConfigError(
                f"plugins.enabled: loading entry point {name!r} ({entry.value}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if "." not in module_name and not attribute and exc.name == module_name:
            raise ConfigError(
                f"plugins.enabled: no plugin named {name!r} (built-ins: "
                f"{', '.join(BUILTINS)}; or an entry point in group 'kvd', or a module path)"
            ) from None
        raise ConfigError(f"plugins.enabled: cannot import {name!r}: {exc}") from None
    except Exception as exc:  # a plugin that fails while importing: SyntaxError, ...
        raise ConfigError(
            f"plugins.enabled: importing {name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    if attribute:
        try:
            target = getattr(target, attribute)
        except AttributeError:
            raise ConfigError(f"plugins.enabled: {module_name} has no {attribute!r}") from None
    return target


def instantiate(target: Any, name: str, settings: dict[str, Any]) -> Any:
    """Build the object to register: ``make_plugin(settings)`` when the module has it."""
    factory = getattr(target, "make_plugin", None)
    if factory is None:
        if settings:
            raise ConfigError(f"unknown setting 'plugins.{name}.{next(iter(settings))}'")
        return target() if isinstance(target, type) else target
    try:
        return factory(dict(settings))
    except (ValueError, TypeError) as exc:
        raise _setting_error(name, exc) from None


def check_routes(manager: pluggy.PluginManager, endpoints: Mapping[str, Mapping[str, str]]) -> None:
    """Call every ``check_routes`` implementation; a refusal is a ConfigError naming its plugin.

    Called one implementation at a time (the hook returns nothing), so that
    a message that does not name its setting can be given the plugin's name.
    """
    for impl in manager.hook.check_routes.get_hookimpls():
        arguments = {"endpoints": endpoints}
        try:
            impl.function(**{name: arguments[name] for name in impl.argnames})
        except (ValueError, TypeError) as exc:
            raise _setting_error(impl.plugin_name, exc) from None


def _setting_error(name: str, exc: Exception) -> ConfigError:
    message = str(exc)
    if not message.startswith(f"plugins.{name}."):  # else it names the setting already
        message = f"plugins.{name}: {message}"
    return ConfigError(message)


def make_plugin_manager(config: Config) -> pluggy.PluginManager:
    """A fresh manager with every enabled plugin registered, in config order."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    enabled = config.plugins.enabled
    for name in enabled:
        plugin = instantiate(resolve_plugin(name), name, config.plugins.settings.get(name, {}))
        try:
            manager.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise ConfigError(f"plugins.enabled: cannot register {name!r}: {exc}") from None
    return manager
