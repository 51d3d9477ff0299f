"""Who may call what: the route -> action table, and the ASGI middlewares that enforce it
(bearer tokens and grants, cross-origin requests, the ``Host`` header).

Route -> action (``url``: the entity the request is about; ``-``: the runtime as a whole, which
needs ``admin`` on every entity):

============================================================  ========  =========
request                                                       action    url
============================================================  ========  =========
``GET /_entities/entities`` (listing)                         (any)     filtered
``PUT /_entities/entities/{type}/{id}``                       spawn     the entity
``GET``/``HEAD /_entities/entities/{type}/{id}``              read      the entity
``DELETE /_entities/entities/{type}/{id}``                    kill      the entity
``DELETE …/{type}/{id}?purge=true`` (delete for good)          admin     the entity
``POST …/send``, ``POST …/call``                             send      the entity
``GET …/replies/{key}``, ``GET …/schedules``                  read      the entity
``PUT``/``DELETE …/schedules/{id}``                           send      the entity
``POST``/``PUT``/``DELETE …/tags/{key}``                      admin     the entity
``… /signal…``, ``… /signals…``                                signal    the entity
``… /approve…``, ``… /approvals…``                             approve   the entity
``GET``/``HEAD /v1/stream/{type}/{id}/…``                     read      the entity
``/_entities/types``, ``workers``, ``dead-letters…``          admin     -
``/metrics``                                                  admin     -
anything else (but the public paths)                          admin     -
============================================================  ========  =========

Public (no token): ``GET`` of the console's pages and assets (``/``, ``/ui/…``: static, no
data), ``/healthz``, ``/readyz``, and CORS preflights (``OPTIONS``). The listing answers only
the entities the principal may ``read``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._auth import Action, AuthConfig, Principal
from ._console import is_console_path
from ._ops import PUBLIC_PATHS
from ._routes import FLAG_VALUES, PRINCIPAL_KEY, error_response

__all__ = [
    "LOOPBACK_NAMES",
    "Authorize",
    "CrossSite",
    "HostCheck",
    "is_loopback",
    "required",
]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_ENTITY_PREFIX = "/_entities/entities/"
_GLOBAL = "-"  # marks a route about no one entity
_CONTROL_METHODS = "GET, HEAD, POST, PUT, DELETE"
_CONTROL_HEADERS = "Authorization, Content-Type, Idempotency-Key"


def _entity_action(method: str, rest: list[str], query: str = "") -> Action:
    """The action of ``/_entities/entities/{type}/{id}/REST...`` (``query``: its query string).
    A purge needs ``admin``: it erases the entity's history, which a kill keeps."""
    if not rest:
        if method == "PUT":
            return "spawn"
        if method == "DELETE":
            return "admin" if _purges(query) else "kill"
        return "read"
    head = rest[0]
    if head in ("send", "call", "inbox"):
        return "send"  # inbox: cancel or edit a queued message
    if head == "replies":
        return "read"
    if head == "fork":
        return "spawn"  # of the source's pattern; the route checks spawn on the new URL too
    if head == "schedules":
        return "read" if len(rest) == 1 else "send"
    if head in ("signal", "signals"):
        return "signal"
    if head in ("approve", "approvals"):
        return "read" if method == "GET" else "approve"
    return "admin"  # tags, compact, and any route this table does not know


def _purges(query: str) -> bool:
    """Whether a query string asks for a purge: any ``purge`` but a false one (a malformed
    value is refused by the route, after this check, so it is taken for a purge here)."""
    values = parse_qs(query, keep_blank_values=True).get("purge", [])
    return any(FLAG_VALUES.get(v.lower(), True) for v in values)


def required(
    method: str, path: str, streams_base: str = "/v1/stream", query: str = ""
) -> tuple[Action, str] | None:
    """What a request needs: ``(action, entity URL)``, ``(action, "-")`` for a route about no
    one entity, or ``None`` for a public one (see the module's table). ``query`` is the query
    string (``purge=true`` makes a DELETE need ``admin``)."""
    if method == "OPTIONS" or path in PUBLIC_PATHS:
        return None
    if method == "GET" and is_console_path(path):
        return None
    if path == "/_entities/entities":
        return ("read", "")  # the listing: each entity is filtered by ``read``
    if path.startswith(_ENTITY_PREFIX):
        parts = path[len(_ENTITY_PREFIX) :].split("/")
        if len(parts) >= 2 and parts[0] and parts[1]:
            return _entity_action(method, parts[2:], query), f"/{parts[0]}/{parts[1]}"
        return ("admin", _GLOBAL)
    if path.startswith(streams_base + "/"):
        parts = path[len(streams_base) + 1 :].split("/")
        if len(parts) >= 3 and parts[0] and parts[1] and not parts[0].startswith("_"):
            return "read", f"/{parts[0]}/{parts[1]}"  # writes are 405 after this, for anyone
    return ("admin", _GLOBAL)


def _bearer(scope: Scope) -> str | None:
    """The bearer token of the request (the scheme name in any case), or ``None``."""
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


class Authorize:
    """Resolve the request's principal from its bearer token and check its grants.

    No token, or one no principal holds: ``401`` with ``WWW-Authenticate: Bearer``. A principal
    without the grant the route needs: ``403 FORBIDDEN`` naming the missing action (and the
    entity). The principal is left in ``scope[PRINCIPAL_KEY]`` for the routes (sender ids,
    the listing's filter).
    """

    def __init__(self, app: ASGIApp, auth: AuthConfig, streams_base: str = "/v1/stream") -> None:
        self.app = app
        self.auth = auth
        self.streams_base = streams_base

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        need = required(scope["method"], scope["path"], self.streams_base, query)
        if need is None:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        principal = None if token is None else self.auth.authenticate(token)
        if principal is None:
            message = "a valid bearer token is required"
            response = error_response(401, "UNAUTHORIZED", message)
            error = "" if token is None else ', error="invalid_token"'
            response.headers["WWW-Authenticate"] = f'Bearer realm="entities"{error}'
            await response(scope, receive, send)
            return
        action, url = need
        if url and not principal.allows(action, None if url == _GLOBAL else url):
            await _forbidden(principal, action, url)(scope, receive, send)
            return
        scope[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)


def _forbidden(principal: Principal, action: Action, url: str) -> ASGIApp:
    where = "on every entity" if url == _GLOBAL else f"on {url}"
    return error_response(
        403,
        "FORBIDDEN",
        f"principal {principal.name!r} has no {action!r} grant {where}",
        {"action": action, "url": None if url == _GLOBAL else url},
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _host_name(host: str) -> str:
    """The name in a ``Host`` header value, without its port (``[::1]:80`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


class CrossSite:
    """Cross-origin rules.

    The control plane, metrics and everything but the streams: a request with an ``Origin``
    that is neither this server's own (same host) nor one of ``origins`` is refused with
    ``403 FORBIDDEN_ORIGIN`` (a browser's simple ``text/plain`` POST from another site never
    reaches a route); a CORS preflight gets the allow headers only for a listed origin. Stream
    reads (``streams_base``) keep the Durable Streams protocol's CORS (the streams app answers
    them); a refusal made before the streams app (``401``/``403``) gets the same
    ``Access-Control-Allow-Origin``, so a browser can read why.
    """

    def __init__(
        self,
        app: ASGIApp,
        origins: Sequence[str] = (),
        streams_base: str = "/v1/stream",
        streams_origins: Sequence[str] = ("*",),
    ) -> None:
        self.app = app
        self.origins = {origin.rstrip("/") for origin in origins}
        self.streams_base = streams_base
        self.streams_any = "*" in streams_origins
        self.streams_origins = set(streams_origins)

    def _same_host(self, scope: Scope, origin: str) -> bool:
        host = _header(scope, b"host")
        _, sep, netloc = origin.partition("://")
        return bool(sep and host) and netloc.lower() == (host or "").lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = None if scope["type"] != "http" else _header(scope, b"origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if (path + "/").startswith(self.streams_base + "/"):
            await self._stream(scope, receive, send, origin)
            return
        listed = origin in self.origins
        if not listed and not self._same_host(scope, origin):
            message = f"cross-origin requests from {origin!r} are not allowed (--cors-origin)"
            await error_response(403, "FORBIDDEN_ORIGIN", message)(scope, receive, send)
            return
        if not listed:
            await self.app(scope, receive, send)
            return
        allow = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-expose-headers", b"WWW-Authenticate, Location"),
            (b"vary", b"Origin"),
        ]
        if scope["method"] == "OPTIONS":
            headers = [
                *allow,
                (b"access-control-allow-methods", _CONTROL_METHODS.encode()),
                (b"access-control-allow-headers", _CONTROL_HEADERS.encode()),
                (b"access-control-max-age", b"600"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, _adding(send, allow))

    async def _stream(self, scope: Scope, receive: Receive, send: Send, origin: str) -> None:
        if not self.streams_any and origin not in self.streams_origins:
            await self.app(scope, receive, send)
            return
        value = b"*" if self.streams_any else origin.encode("latin-1")
        extra = [(b"access-control-allow-origin", value)]
        extra.append((b"access-control-expose-headers", b"WWW-Authenticate"))

        async def send_with_origin(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                if b"access-control-allow-origin" not in names:  # refused before the streams
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_origin)


def _adding(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    async def send_with(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return send_with


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address) is a loopback one (``127.0.0.0/8``, ``::1``,
    ``localhost``)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HostCheck:
    """Refuse (``421 MISDIRECTED_HOST``) requests whose ``Host`` names none of ``names`` (any
    port): a page of another site that resolves its own name to a loopback address (DNS
    rebinding) cannot then talk to a server bound there."""

    def __init__(self, app: ASGIApp, names: Sequence[str]) -> None:
        self.app = app
        self.names = {name.strip().strip("[]").lower() for name in names}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host") or ""
            if _host_name(host) not in self.names:
                message = f"this server does not answer for host {host!r} (--allowed-host)"
                await error_response(421, "MISDIRECTED_HOST", message)(scope, receive, send)
                return
        await self.app(scope, receive, send)
