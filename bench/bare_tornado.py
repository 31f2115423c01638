"""A bare Tornado key-value server: the framework ceiling kvd is measured against.

    python bench/bare_tornado.py [--port 0] [--loop asyncio|uvloop]

The same API subset as kvd's hot paths, written the obvious way: a dict in
memory, stdlib ``json``, no journal, no plugins, no validation beyond parsing
the body. ``GET /keys/{id}``, ``PUT /keys/{id}`` (201 created / 200 replaced,
body ``{"<id>": <value>}``) and ``GET /keys?filter=`` with kvd's pattern
language (``*`` and ``$`` any run, ``?`` one character, ``\\`` escapes),
matched naively: the pattern becomes a regex tried against every key.

Prints ``listening on http://127.0.0.1:PORT`` on stderr (like kvd), so the
benchmark can pass ``--port 0``. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

_ABSENT = object()


def compile_filter(pattern: str) -> re.Pattern[str]:
    """kvd's filter language as a regex; raises ValueError on a trailing lone backslash."""
    parts: list[str] = []
    chars = iter(pattern)
    for char in chars:
        if char in "*$":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("pattern ends with a lone backslash")
            parts.append(re.escape(escaped))
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


class JSONHandler(RequestHandler):
    def initialize(self, data: dict[str, object]) -> None:
        self.data = data

    def send(self, status: int, payload: object) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))

    def fail(self, status: int, code: str, message: str) -> None:
        self.send(status, {"error": {"code": code, "message": message}})


class KeyHandler(JSONHandler):
    def get(self, key: str) -> None:
        value = self.data.get(key, _ABSENT)
        if value is _ABSENT:
            self.fail(404, "not_found", "no such key")
            return
        self.send(200, {key: value})

    def put(self, key: str) -> None:
        try:
            value = json.loads(self.request.body)
        except ValueError:
            self.fail(400, "bad_request", "body is not JSON")
            return
        created = key not in self.data
        self.data[key] = value
        self.send(201 if created else 200, {key: value})


class KeysHandler(JSONHandler):
    def get(self) -> None:
        pattern = self.get_query_argument("filter", None)
        try:
            matcher = compile_filter(pattern) if pattern is not None else None
        except ValueError as exc:
            self.fail(400, "bad_request", str(exc))
            return
        self.send(
            200,
            {
                key: self.data[key]
                for key in sorted(self.data)
                if matcher is None or matcher.fullmatch(key)
            },
        )


def make_app() -> Application:
    shared = {"data": {}}
    return Application(
        [(r"/keys", KeysHandler, shared), (r"/keys/(.+)", KeyHandler, shared)],
        log_function=lambda handler: None,  # kvd logs no access lines by default either
    )


async def serve(host: str, port: int) -> None:
    sockets = bind_sockets(port, host)
    server = HTTPServer(make_app())
    server.add_sockets(sockets)
    bound = sockets[0].getsockname()[1]
    print(f"listening on http://{host}:{bound}", file=sys.stderr, flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    server.stop()
    await server.close_all_connections()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default) picks a free port")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.host, args.port))
    else:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
