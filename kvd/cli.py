"""The ``kvd`` command: ``serve``, ``plugins`` and ``token`` (``journal`` tools come with the audit work).

Usage errors and bad settings exit 2 with a message naming the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from kvd import __version__
from kvd.config import FSYNC_POLICIES, Config, ConfigError, load_config

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvd", description="kvd key-value HTTP daemon")
    parser.add_argument("--version", action="version", version=f"kvd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    _add_config_option(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000; 0 picks one)")
    serve.add_argument("--data-dir", help="journal directory (default ./data)")
    serve.add_argument("--fsync", choices=FSYNC_POLICIES, help="durability policy")
    serve.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="log verbosity (default info)",
    )
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (method, route, status)"
    )

    plugins = commands.add_parser("plugins", help="list plugins and which are enabled")
    _add_config_option(plugins)

    token = commands.add_parser("token", help="manage the auth plugin's bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    token_new = token_commands.add_parser(
        "new", help="make a token: print it once, with the line to add to [plugins.auth] tokens"
    )
    _add_config_option(token_new)
    token_new.add_argument("name", metavar="NAME", help="the token's name (recorded as the actor of its writes)")
    token_new.add_argument(
        "--scope", required=True, action="append", metavar="SCOPES",
        help="comma-separated scopes: read, write, admin (admin implies all)",
    )
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="F", help="TOML settings file (default config/kvd.toml)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            overrides={
                "server.host": getattr(args, "host", None),
                "server.port": getattr(args, "port", None),
                "journal.data_dir": getattr(args, "data_dir", None),
                "journal.fsync": getattr(args, "fsync", None),
            },
        )
        if args.command == "serve":
            return _serve(config, args)
        if args.command == "token":
            return _new_token(args)
        return _list_plugins(config)
    except ConfigError as exc:
        print(f"kvd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _serve(config: Config, args: argparse.Namespace) -> int:
    from kvd.plugins import make_plugin_manager
    from kvd.server import serve

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kvd.access").setLevel(logging.INFO if args.access_log else logging.WARNING)
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    plugins = make_plugin_manager(config)  # a bad plugin exits 2 before anything starts
    return _run(serve(config, plugins))


def _run(main_coroutine) -> int:  # noqa: ANN001
    """Run on uvloop when it is installed (it is in requirements.txt), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coroutine)
    return uvloop.run(main_coroutine)


def _list_plugins(config: Config) -> int:
    from kvd.plugins import available_plugins, make_plugin_manager

    manager = make_plugin_manager(config)
    enabled = config.plugins.enabled
    names = list(available_plugins()) + [name for name in enabled if name not in available_plugins()]
    width = max(len(name) for name in names)
    for name in names:
        plugin = manager.get_plugin(name)
        hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin)) if plugin else []
        state = "enabled " if name in enabled else "disabled"
        where = available_plugins().get(name, name)
        print(f"{name:<{width}}  {state}  {where}" + (f"  hooks: {', '.join(hooks)}" if hooks else ""))
    return 0


def _new_token(args: argparse.Namespace) -> int:
    """Print a fresh token (stdout line 1) and its config line (line 2); kvd keeps only the digest."""
    import json
    import secrets

    from kvd.plugins.auth import SCOPES, check_name, check_scopes, token_digest

    requested = [part.strip() for value in args.scope for part in value.split(",") if part.strip()]
    try:
        name = check_name(args.name, "token NAME")
        scopes = check_scopes(requested, "--scope")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    ordered = [scope for scope in SCOPES if scope in scopes]
    token = secrets.token_urlsafe(32)
    # JSON string syntax is valid TOML basic-string syntax for every name check_name allows.
    line = (
        f"{{ name = {json.dumps(name, ensure_ascii=False)}, sha256 = \"{token_digest(token)}\", "
        f"scopes = {json.dumps(ordered)} }}"
    )
    print(
        "kvd: the token is shown once and kvd keeps only its SHA-256; store it now. "
        "Add the second line to tokens in [plugins.auth]:",
        file=sys.stderr,
        flush=True,
    )
    print(token)
    print(line)
    return 0
