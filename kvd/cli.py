"""The ``kvd`` command: ``serve`` and ``plugins`` (``journal`` tools come with the audit work).

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
    make_plugin_manager(config)  # fail with exit 2 on a bad plugin before anything starts
    return _run(serve(config))


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
