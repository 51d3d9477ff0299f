"""The ASGI application: routing, error mapping, CORS and browser security headers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import Store, StreamsError
from ._context import Context, reply
from ._fanout import Fanout
from ._protocol import Problem, from_store_error
from ._read import handle_get, handle_head
from ._settings import ServerSettings
from ._subscription_routes import handle_reserved
from ._subscriptions import Subscriptions
from ._write import handle_delete, handle_post, handle_put

__all__ = ["StreamsApp", "create_app"]

logger = logging.getLogger("streams.server")

Handler = Callable[[Context, Request], Awaitable[Response]]

_METHODS = "GET, POST, PUT, DELETE, HEAD, OPTIONS"
_ALLOW_HEADERS = ", ".join(
    [
        "Content-Type",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-Closed",
        "Stream-Seq",
        "Stream-Forked-From",
        "Stream-Fork-Offset",
        "Stream-Fork-Sub-Offset",
        "Producer-Id",
        "Producer-Epoch",
        "Producer-Seq",
        "If-None-Match",
        "Cache-Control",
        "Authorization",
    ]
)
_EXPOSE_HEADERS = ", ".join(
    [
        "Stream-Next-Offset",
        "Stream-Cursor",
        "Stream-Up-To-Date",
        "Stream-Closed",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-SSE-Data-Encoding",
        "Producer-Epoch",
        "Producer-Seq",
        "Producer-Expected-Seq",
        "Producer-Received-Seq",
        "ETag",
        "Content-Type",
        "Location",
    ]
)


class StreamsApp:
    """The ASGI app :func:`create_app` returns.

    It adds the security and CORS headers to every response and answers CORS preflights.
    ``aclose()`` stops its background work (webhook deliveries, lease timers, shared waits); the
    app's own lifespan does that too when the server runs it.
    """

    def __init__(self, app: ASGIApp, origins: tuple[str, ...], ctx: Context) -> None:
        self.app = app
        self._ctx = ctx
        self.any_origin = "*" in origins
        self.origins = {origin.encode() for origin in origins}

    def _origin(self, scope: Scope) -> bytes | None:
        if self.any_origin:
            return b"*"
        for name, value in scope["headers"]:
            if name == b"origin":
                return value if value in self.origins else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = self._origin(scope)
        extra = [
            (b"x-content-type-options", b"nosniff"),
            (b"cross-origin-resource-policy", b"cross-origin"),
        ]
        if origin is not None:
            extra.append((b"access-control-allow-origin", origin))
            extra.append((b"access-control-expose-headers", _EXPOSE_HEADERS.encode()))
            if not self.any_origin:
                extra.append((b"vary", b"Origin"))
        if scope["method"] == "OPTIONS":
            headers = [
                *extra,
                (b"access-control-allow-methods", _METHODS.encode()),
                (b"access-control-allow-headers", _ALLOW_HEADERS.encode()),
                (b"access-control-max-age", b"86400"),
                (b"allow", _METHODS.encode()),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def aclose(self) -> None:
        await self._ctx.subscriptions.aclose()
        await self._ctx.fanout.aclose()


def _problem_response(problem: Problem) -> Response:
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **problem.headers}
    return reply(problem.status, headers, problem.body())


def _endpoint(
    ctx: Context, handlers: dict[str, Handler]
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        handler = handlers.get(request.method)
        try:
            if handler is None:
                raise Problem(405, "METHOD_NOT_ALLOWED", f"{request.method} is not supported")
            return await handler(ctx, request)
        except Problem as problem:
            return _problem_response(problem)
        except StreamsError as exc:
            mapped = from_store_error(exc, creating=request.method == "PUT")
            if mapped.status >= 500:
                logger.error("store error on %s %s: %r", request.method, request.url.path, exc)
            return _problem_response(mapped)
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            return _problem_response(Problem(500, "INTERNAL", "internal server error"))

    return endpoint


async def _not_found(request: Request) -> Response:
    return _problem_response(Problem(404, "NOT_FOUND", f"no route for {request.url.path!r}"))


def create_app(store: Store, *, settings: ServerSettings | None = None) -> StreamsApp:
    """Return an ASGI app that serves ``store`` with the Durable Streams protocol.

    Streams live at ``{settings.base_path}/{path}`` (``/v1/stream/...`` by default). The store
    must be open while the app serves requests; the app never closes it.
    """
    settings = settings or ServerSettings()
    fanout = Fanout(
        store,
        max_wait_s=max(settings.long_poll_timeout_s, settings.sse_keepalive_s),
        read_max_messages=settings.read_max_messages,
        read_max_bytes=settings.read_max_bytes,
    )
    subscriptions = Subscriptions(
        store,
        allow_private_webhooks=settings.allow_private_webhooks,
        allow_loopback_webhooks=settings.allow_loopback_webhooks,
    )
    ctx = Context(store, settings, fanout, subscriptions)
    methods = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH"]
    streams: dict[str, Handler] = {
        "GET": handle_get,
        "HEAD": handle_head,
        "PUT": handle_put,
        "POST": handle_post,
        "DELETE": handle_delete,
    }
    reserved: dict[str, Handler] = dict.fromkeys(
        ["GET", "HEAD", "PUT", "POST", "DELETE"], handle_reserved
    )
    streams_app: StreamsApp | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if streams_app is not None:
                await streams_app.aclose()

    base = settings.base_path
    app = Starlette(
        routes=[
            Route(base + "/__ds/{rest:path}", _endpoint(ctx, reserved), methods=methods),
            Route(base + "/{path:path}", _endpoint(ctx, streams), methods=methods),
            Route("/{rest:path}", _not_found, methods=methods),
        ],
        lifespan=lifespan,
    )
    streams_app = StreamsApp(app, settings.cors_origins, ctx)
    return streams_app
