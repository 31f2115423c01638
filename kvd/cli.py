"""The ``kvd`` command line: ``serve``, ``plugins``, ``token``, ``journal`` and ``torture``.

This module only parses arguments and loads settings; ``kvd.audit`` does the
``journal`` actions and ``kvd.torture`` the crash test. Usage errors and bad settings exit 2 with a message
naming the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from kvd import __version__
from kvd.audit.verify import ExpectedHead
from kvd.config import FSYNC_POLICIES, Config, ConfigError, load_config, name_the_variable
from kvd.log.format import OPS, parse_ts
from kvd.model import KeyFilter

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
    _add_journal_commands(commands)
    from kvd import torture

    torture.build_parser(commands)
    return parser


JOURNAL_DESCRIPTION = """\
Audit and maintain a store's journal. dump, verify, replay, history and stats
only read (no lock, no writes), so they are safe on a running server's
directory. compact and repair change it and refuse while a server runs.
Times (T) are ISO 8601 (2026-11-27T18:38:34Z; no zone means UTC; a date alone
is its midnight). Exit status: 0 done, 1 failed (damage found, a point older
than the retained history, store in use), 2 usage error, 3 verify could not
check (files kept moving under a running compaction; nothing found damaged).
A NATS-backed store: --nats URL [--stream NAME] instead of --data-dir exports
the stream and its snapshots into a temporary data directory (--keep-export
DIR keeps it) and runs the command there; nothing in NATS changes. compact and
repair exit 2 with --nats."""


def _add_journal_commands(commands: argparse._SubParsersAction) -> None:
    journal = commands.add_parser(
        "journal", help="audit and maintain the journal (dump, verify, replay, ...)",
        description=JOURNAL_DESCRIPTION,
    )
    actions = journal.add_subparsers(dest="journal_command", required=True, metavar="ACTION")

    dump = _journal_action(
        actions, "dump", "print records as JSON Lines, exactly as stored",
        "Print the retained records (archive included), oldest first, byte for byte as "
        "stored, so jq works and every hash can be recomputed. Filters combine (AND). "
        "Ranges are inclusive at both ends. On a damaged journal: the records before the "
        "damage, then an error naming it, exit 1.",
    )
    dump.add_argument(
        "--key", metavar="PATTERN", type=_key_pattern,
        help="records that change a matching key (the ?filter= language: * any run, ? one "
             "character, \\ escapes); a clear changes every key",
    )
    dump.add_argument("--op", action="append", choices=OPS, help="only this op (repeatable)")
    since = dump.add_mutually_exclusive_group()
    since.add_argument("--since", metavar="T", type=_time, help="records written at or after T")
    since.add_argument("--since-seq", metavar="N", type=_seq, help="records with seq >= N")
    until = dump.add_mutually_exclusive_group()
    until.add_argument("--until", metavar="T", type=_time, help="records written at or before T")
    until.add_argument("--until-seq", metavar="N", type=_seq, help="records with seq <= N")

    verify = _journal_action(
        actions, "verify", "check checksums, the hash chain and snapshots; exit 0 clean, 1 damaged",
        "Check every retained record (checksum, seq, link to the record before), every "
        "segment boundary, and every snapshot (digest; head against its record; entries "
        "against the replayed records). Prints a summary ending in the head as SEQ:HASH, or "
        "a DAMAGED line naming the file, byte offset and seq of the first bad record. A torn "
        "last record (a write in progress, or a crash mid-write) is a warning, not damage: "
        "it was never acknowledged and kvd serve cuts it at start-up.",
    )
    verify.add_argument(
        "--expect-head", metavar="SEQ:HASH", type=_expected_head,
        help="a head printed by an earlier verify: fail unless record SEQ still has HASH "
             "(detects records cut off the end, and rewritten history)",
    )

    replay = _journal_action(
        actions, "replay", "print the state at a time or seq as one JSON object",
        "Print the store's keys and values at that point as one JSON object sorted by key. "
        "Keys that had expired at that moment (T, or record N's time) are left out. A point "
        "older than the retained history exits 1.",
    )
    point = replay.add_mutually_exclusive_group(required=True)
    point.add_argument("--at", metavar="T", type=_time, help="the state at time T")
    point.add_argument("--seq", metavar="N", type=_seq, help="the state right after record N (0: empty)")

    history = _journal_action(
        actions, "history", "every change of one key, oldest first, as JSON Lines",
        'One line per record that changed KEY: {"seq", "ts", "op", "actor" and "client" when '
        'recorded, "value" and "expires" for a put}. delete, expire and clear records show '
        "with their op (a clear only when the key existed). KEY is literal, not a pattern. "
        "Exit 0 with no output when the key never changed in the retained history. On a "
        "damaged journal: the changes before the damage, then an error naming it, exit 1.",
    )
    history.add_argument("key", metavar="KEY", help="the key (literal)")

    stats = _journal_action(
        actions, "stats", "records, segments, bytes, live keys, snapshots, head",
        "Records (by op), segments, snapshots, archive and quarantine (files and bytes), live "
        "keys now, the oldest retained point and the head seq and hash.",
    )
    stats.add_argument("--json", action="store_true", help="one JSON object, for machines")

    _journal_action(
        actions, "compact", "compact a stopped store",
        "Snapshot the state and retire the segments it replaces (deleted, or moved to "
        "archive/ when journal.archive is on). Takes the data directory's lock: exits 1 "
        "while a server runs (use POST /journal/compact then). Not for a NATS-backed "
        "store: with --nats it exits 2, as the running nodes compact the shared stream.",
        changes=True,
    )

    repair = _journal_action(
        actions, "repair", "cut damaged records into quarantine/ so the store opens",
        "Find the first damage start-up would stop at and move that record and everything "
        "after it into quarantine/ (fsynced; nothing is deleted); a damaged newest snapshot "
        "is replaced by an older base from the archive when one exists, else nothing changes "
        "and it exits 1. Takes the lock: exits 1 while a server runs. Exits 0 when verify "
        "passes afterwards. Not for a NATS-backed store: with --nats it exits 2 (cutting "
        "records out of the shared stream is not supported); export it with `verify --nats "
        "URL --keep-export DIR` and inspect DIR instead.",
        changes=True,
    )
    repair.add_argument(
        "--dry-run", action="store_true",
        help="print what would be cut and whether verify would pass afterwards (the exit status "
        "the repair would have); change nothing",
    )


def _journal_action(
    actions: argparse._SubParsersAction, name: str, summary: str, description: str,
    *, changes: bool = False,
) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=summary, description=description)
    _add_config_option(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", metavar="D", help="the store's directory (default: journal.data_dir)")
    if changes:
        source.add_argument(
            "--nats", metavar="URL", action="append",
            help="a NATS-backed store: refused (exit 2), this command would change the shared stream",
        )
        parser.add_argument("--stream", metavar="NAME", help="with --nats: the journal stream")
        return parser
    source.add_argument(
        "--nats", metavar="URL", action="append",
        help="read a NATS-backed store instead of a data directory: its JetStream stream and "
             "snapshot bucket, from this server (repeatable, or comma-separated for a "
             "cluster), exported into a temporary data directory first (read-only)",
    )
    parser.add_argument(
        "--stream", metavar="NAME",
        help="with --nats: the journal stream (default: journal.nats.stream, KVD); snapshots "
             "are read from object store bucket NAME-snapshots",
    )
    parser.add_argument(
        "--keep-export", metavar="DIR",
        help="with --nats: export into DIR (created, or empty) and keep it, a data directory "
             "for later --data-dir runs (default: a temporary directory, removed afterwards)",
    )
    return parser


def _time(text: str) -> float:
    try:
        return parse_ts(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def _seq(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a sequence number (0, 1, 2, ...): {text!r}")
    return int(text)


def _key_pattern(text: str) -> KeyFilter:
    from kvd.errors import KvdError
    from kvd.plugins.filter import compile_pattern

    try:
        return compile_pattern(text)
    except KvdError as exc:
        # str(exc) leads with the HTTP status and code ("400 bad_request: ..."),
        # which mean nothing on a command line: only the message is the user's.
        raise argparse.ArgumentTypeError(exc.message) from None


def _expected_head(text: str) -> ExpectedHead:
    seq, _, digest = text.partition(":")
    digest = digest.lower()
    if not seq.isdigit() or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise argparse.ArgumentTypeError(
            f"expected SEQ:HASH (a seq, a colon, 64 lowercase hex digits), not {text!r}"
        )
    return ExpectedHead(int(seq), digest)


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
        if args.command == "journal":
            from kvd import audit

            return audit.run(config, args)
        if args.command == "torture":
            from kvd import torture

            return torture.main(args)
        return _list_plugins(config)
    except ConfigError as exc:
        message = str(exc) if exc.located else name_the_variable(str(exc), os.environ)
        print(f"kvd: error: {message}", file=sys.stderr)
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
