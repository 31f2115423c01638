"""``/openapi.json``: the OpenAPI 3.1 document that describes this API.

The document ships inside the package (``kvd/openapi.json``) and is read once,
at import; every request answers the same bytes. It is open to everyone, like
``/healthz``: describing the API reveals nothing a client could not learn by
calling it. ``tests/test_openapi.py`` keeps the document and the code in step.
"""

from __future__ import annotations

from importlib import resources

from kvd.handlers.base import BaseHandler

OPENAPI_DOCUMENT: bytes = resources.files("kvd").joinpath("openapi.json").read_bytes()


class OpenAPIHandler(BaseHandler):
    """``GET /openapi.json``: the API description, for clients and contract tests."""

    endpoint = "/openapi.json"
    scopes: dict[str, str] = {}

    def get(self) -> None:
        self.send_json(OPENAPI_DOCUMENT)

    head = get
