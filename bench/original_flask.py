"""The original design, re-created: Flask's development server over pickledb 0.9.2.

    python bench/original_flask.py --data-dir D [--port 0]

``GET``/``HEAD``/``DELETE /keys/<id>``, ``GET /keys?filter=`` (kvd's pattern
language, matched naively against every key) and ``PUT /keys`` with a JSON
object body. Every write request ends with pickledb's ``dump()``, which
rewrites the whole database as JSON (twice, as 0.9.2 does, and without fsync).
A lock serialises writes: pickledb is not thread-safe and the development
server runs one thread per connection, speaking HTTP/1.0 (a connection per
request) as it does by default.

Prints ``listening on http://127.0.0.1:PORT`` on stderr (like kvd), so the
benchmark can pass ``--port 0``. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import pickledb
from bare_tornado import compile_filter  # the same naive matcher as the bare reference
from flask import Flask, jsonify, request
from werkzeug.serving import make_server


def make_app(path: str) -> Flask:
    app = Flask(__name__)
    # sig=False: pickledb 0.9.2's SIGTERM handler takes no arguments and would crash.
    db = pickledb.load(path, False, sig=False)
    write_lock = threading.Lock()

    def error(status: int, code: str, message: str):  # noqa: ANN202 - a Flask response
        return jsonify({"error": {"code": code, "message": message}}), status

    @app.route("/keys/<path:key>", methods=["GET", "HEAD", "DELETE"])
    def one_key(key: str):  # noqa: ANN202
        if request.method == "DELETE":
            with write_lock:
                if not db.exists(key):
                    return error(404, "not_found", "no such key")
                db.rem(key)
                db.dump()
            return "", 204
        if not db.exists(key):
            return error(404, "not_found", "no such key")
        return jsonify({key: db.get(key)})

    @app.route("/keys", methods=["GET", "PUT"])
    def keys():  # noqa: ANN202
        if request.method == "PUT":
            body = request.get_json(silent=True)
            if not isinstance(body, dict) or not body:
                return error(400, "bad_request", "body must be a non-empty JSON object")
            with write_lock:
                for key, value in body.items():
                    db.set(key, value)
                db.dump()
            return jsonify({"stored": list(body)})
        pattern = request.args.get("filter")
        try:
            matcher = compile_filter(pattern) if pattern is not None else None
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        return jsonify(
            {key: db.get(key) for key in sorted(db.getall()) if matcher is None or matcher.fullmatch(key)}
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default) picks a free port")
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    app = make_app(os.path.join(args.data_dir, "kv.db"))
    # What app.run() does, minus the banner, so the bound port can be read back.
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"listening on http://{args.host}:{server.server_port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
