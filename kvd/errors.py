"""Client-facing errors: each carries its HTTP status and SPEC error code.

They subclass tornado's HTTPError so that raising one anywhere in a handler
ends the request through the one ``write_error`` in ``kvd.handlers.base``.
"""

from __future__ import annotations

from tornado.web import HTTPError


class KvdError(HTTPError):
    """An error answered as ``{"error": {"code": ..., "message": ...}}``."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(self.status, reason=None)
        self.message = message
        self.headers = headers or {}

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class BadRequest(KvdError):
    status, code = 400, "bad_request"


class Unauthorized(KvdError):
    status, code = 401, "unauthorized"


class Forbidden(KvdError):
    status, code = 403, "forbidden"


class NotFound(KvdError):
    status, code = 404, "not_found"


class MethodNotAllowed(KvdError):
    status, code = 405, "method_not_allowed"


class Gone(KvdError):
    status, code = 410, "gone"


class PreconditionFailed(KvdError):
    status, code = 412, "precondition_failed"


class PayloadTooLarge(KvdError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(KvdError):
    status, code = 415, "unsupported_media_type"


class HeaderTooLarge(KvdError):
    """A request head over ``server.max_header_bytes`` (answered by kvd.handlers.framing)."""

    status, code = 431, "header_too_large"


class Unavailable(KvdError):
    status, code = 503, "unavailable"


CODES_BY_STATUS: dict[int, str] = {
    cls.status: cls.code
    for cls in (
        BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, Gone,
        PreconditionFailed, PayloadTooLarge, UnsupportedMediaType, HeaderTooLarge, Unavailable,
        KvdError,
    )
}


def plugin_required(feature: str, plugin: str) -> BadRequest:
    """The 400 for a feature whose plugin is switched off."""
    return BadRequest(
        f"{feature} needs the '{plugin}' plugin; enable it in [plugins] enabled"
    )
