"""The built-in ``auth`` plugin: bearer tokens from config, stored as SHA-256 digests.

Each token has a name (recorded as the journal's ``actor`` of the writes it
makes, and the only thing about it kvd ever shows) and scopes. ``admin``
implies every scope, so an admin token reaches every protected route. A route
needs the scope its handler declares (reads ``read``, writes ``write``,
``/journal`` and ``/metrics`` ``admin``) unless ``[plugins.auth] scopes``
names another one, or ``"none"`` to open it. ``/healthz``, ``/readyz`` and
``/openapi.json`` declare no scope, so they are always open and this plugin
is never asked. An override must name a route the app serves, with a scope:
the route table is known only once every plugin has added its routes, so
that is checked in ``check_routes``.

The presented token is hashed and its digest compared, in constant time, with
every configured digest; nothing is keyed by the secret, and neither the
token nor a configured digest is ever logged or echoed in a message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvd import hookimpl
from kvd.errors import Forbidden, Unauthorized

READ, WRITE, ADMIN = "read", "write", "admin"
SCOPES = (READ, WRITE, ADMIN)
OPEN = "none"
"""A ``scopes`` override value meaning: the route needs no token."""

ALWAYS_OPEN = ("/healthz", "/readyz")
"""Routes that declare no scope; the authenticate hook never runs for them."""

DEFAULT_REALM = "kvd"

_DIGEST = re.compile(r"[0-9a-f]{64}")
# RFC 6750 section 2.1: credentials = "Bearer" 1*SP b64token
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*) *", re.IGNORECASE)
_REALM = re.compile(r"[\x20-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Token:
    """One configured token: never the secret, only its digest."""

    name: str
    digest: bytes = field(repr=False)
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        # admin implies every scope, including any a plugin route invents.
        return ADMIN in self.scopes or scope in self.scopes


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token, as it goes in ``[plugins.auth] tokens``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: Any, label: str) -> str:
    """A token name: a non-empty string without control characters; ``label`` names the setting."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{label} must be a non-empty string")
    if _CONTROL.search(name):
        raise ValueError(f"{label} must not contain control characters")
    return name


def check_scopes(scopes: Any, label: str) -> frozenset[str]:
    """A token's scopes: a non-empty list drawn from read, write and admin."""
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ValueError(f"{label} must be a non-empty list of {', '.join(SCOPES)}")
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if unknown:
        raise ValueError(f"{label}: unknown scope {unknown[0]!r} (scopes are {', '.join(SCOPES)})")
    return frozenset(scopes)


def _parse_tokens(entries: Any) -> tuple[Token, ...]:
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            "plugins.auth.tokens must be a non-empty list of "
            '{ name = "...", sha256 = "...", scopes = [...] } (make one with: kvd token new NAME --scope read)'
        )
    tokens: list[Token] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for index, entry in enumerate(entries):
        where = f"plugins.auth.tokens[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a table with name, sha256 and scopes")
        name = check_name(entry.get("name"), f"{where}.name")
        where = f"{where} (token {name!r})"
        unknown = sorted(set(entry) - {"name", "sha256", "scopes"})
        if unknown:
            raise ValueError(f"{where}: unknown setting {unknown[0]!r}")
        if name in names:
            raise ValueError(f"{where}: name is used by another token")
        digest = entry.get("sha256")
        # Never echo the value: an operator may have pasted the token itself here.
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ValueError(
                f"{where}.sha256 must be 64 lowercase hex digits (the SHA-256 of the token, "
                "not the token)"
            )
        raw = bytes.fromhex(digest)
        if raw in digests:
            raise ValueError(f"{where}.sha256 is the same as another token's")
        scopes = check_scopes(entry.get("scopes"), f"{where}.scopes")
        names.add(name)
        digests.add(raw)
        tokens.append(Token(name=name, digest=raw, scopes=scopes))
    return tuple(tokens)


def _where(route: str) -> str:
    """The override's setting as TOML spells it: ``plugins.auth.scopes."/keys"``."""
    return f"plugins.auth.scopes.{json.dumps(route, ensure_ascii=False)}"


def _parse_route_scopes(table: Any) -> dict[str, str]:
    if not isinstance(table, dict):
        raise ValueError('plugins.auth.scopes must be a table like { "/metrics" = "read" }')
    routes: dict[str, str] = {}
    for route, scope in table.items():
        where = _where(route)
        if not route.startswith("/"):
            raise ValueError(f"{where}: a route template starts with '/' (like \"/keys/{{id}}\")")
        if route in ALWAYS_OPEN:
            raise ValueError(f"{where}: {route} is always open and cannot need a scope")
        if scope not in (*SCOPES, OPEN):
            raise ValueError(f"{where} must be one of {', '.join((*SCOPES, OPEN))}, not {scope!r}")
        routes[route] = scope
    return routes


class AuthPlugin:
    def __init__(
        self,
        tokens: Iterable[Token],
        route_scopes: dict[str, str] | None = None,
        realm: str = DEFAULT_REALM,
    ) -> None:
        self.tokens = tuple(tokens)
        self.route_scopes = dict(route_scopes or {})
        self.realm = realm
        self._realm = f'Bearer realm="{realm}"'
        self._challenge = {"WWW-Authenticate": self._realm}
        self._bad_request = {"WWW-Authenticate": f'{self._realm}, error="invalid_request"'}
        self._bad_token = {"WWW-Authenticate": f'{self._realm}, error="invalid_token"'}

    def identify(self, presented: str) -> Token | None:
        """The token whose digest matches, comparing with every one in constant time."""
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: Token | None = None
        for token in self.tokens:
            # compare_digest runs first and for every token: no early exit on a match.
            if hmac.compare_digest(digest, token.digest) and found is None:
                found = token
        return found

    @hookimpl
    def check_routes(self, endpoints: Mapping[str, Mapping[str, str]]) -> None:
        """Refuse an override of a route nobody serves (a typo such as "/key", or the
        route of a plugin that is not enabled) or of one that is always open: either
        would be ignored while the operator believes it applies."""
        scoped = sorted(route for route, scopes in endpoints.items() if scopes)
        for route in self.route_scopes:
            if route not in endpoints:
                raise ValueError(
                    f"{_where(route)}: no route {route} is served (routes that take a scope: "
                    f"{', '.join(scoped)}; a plugin's routes exist only while it is enabled)"
                )
            if not endpoints[route]:
                raise ValueError(f"{_where(route)}: {route} is always open and cannot need a scope")

    @hookimpl
    def authenticate(self, request: Any, scope: str, endpoint: str) -> str | None:
        needed = self.route_scopes.get(endpoint, scope)
        values = request.headers.get_list("Authorization")
        if not values:
            if needed == OPEN:
                return None
            raise Unauthorized(
                f"{endpoint} needs a token with scope {needed!r}: send Authorization: Bearer <token>",
                headers=self._challenge,
            )
        if len(values) > 1:
            raise Unauthorized("send one Authorization header, not several", headers=self._bad_request)
        match = _BEARER.fullmatch(values[0])
        if match is None:
            if not values[0].lower().startswith("bearer"):
                raise Unauthorized(
                    "kvd accepts only bearer tokens: Authorization: Bearer <token>",
                    headers=self._challenge,
                )
            raise Unauthorized(
                "malformed Authorization header: expected Bearer <token>",
                headers=self._bad_request,
            )
        # A presented token is checked even on an open route, so that a mistyped
        # token is refused rather than quietly acting anonymously.
        token = self.identify(match.group(1))
        if token is None:
            raise Unauthorized("the bearer token is not valid", headers=self._bad_token)
        if needed != OPEN and not token.allows(needed):
            raise Forbidden(
                f"{endpoint} needs scope {needed!r}; token {token.name!r} has "
                f"{', '.join(sorted(token.scopes))}",
                headers={
                    "WWW-Authenticate": f'{self._realm}, error="insufficient_scope", '
                    f'scope="{needed}"'
                },
            )
        return token.name


def make_plugin(settings: dict[str, Any]) -> AuthPlugin:
    unknown = sorted(set(settings) - {"tokens", "scopes", "realm"})
    if unknown:
        raise ValueError(f"unknown setting plugins.auth.{unknown[0]}")
    tokens = _parse_tokens(settings.get("tokens"))
    route_scopes = _parse_route_scopes(settings.get("scopes", {}))
    realm = settings.get("realm", DEFAULT_REALM)
    if not isinstance(realm, str) or not _REALM.fullmatch(realm) or '"' in realm or "\\" in realm:
        raise ValueError(
            "plugins.auth.realm must be non-empty printable ASCII without quotes or backslashes"
        )
    return AuthPlugin(tokens, route_scopes, realm)
