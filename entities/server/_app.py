"""One ASGI app for the whole runtime, and ``serve()``: uvicorn plus an embedded worker."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streams.server import ServerSettings
from streams.server import create_app as create_streams_app

from .. import _tracing as tracing
from .._runtime import Runtime
from .._worker import Worker
from ._access import LOOPBACK_NAMES, Authorize, CrossSite, HostCheck, is_loopback
from ._auth import AuthConfig
from ._console import console_routes
from ._embedded import EmbeddedWorker, can_embed
from ._openapi import openapi_route
from ._ops import ops_routes
from ._routes import control_routes, error_response

__all__ = ["ServeOptions", "create_app", "serve", "serve_metrics"]

logger = logging.getLogger("entities.server")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How ``entities serve`` runs: address, auth, limits, and whether to run a worker.

    ``token`` is the one-admin shortcut, ``auth`` the principals and their grants (not both).
    ``cors_origins`` are the origins whose pages may call the control plane. Bound to a
    loopback address, the server answers only requests whose ``Host`` is a loopback name or
    one of ``allowed_hosts``; bound elsewhere, ``allowed_hosts`` (when given) are the only names
    it answers for.
    """

    host: str = "127.0.0.1"
    port: int = 4437
    token: str | None = None
    auth: AuthConfig | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    worker: bool = True
    max_body_bytes: int = 1024 * 1024
    max_header_bytes: int = 64 * 1024
    streams: ServerSettings = field(default_factory=ServerSettings)
    log_level: str = "warning"
    shutdown_seconds: int = 5


class _HeaderLimit:
    """Answer ``431`` when a request's headers (names and values) exceed ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            size += len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            if size > self.limit:
                response = error_response(
                    431, "HEADERS_TOO_LARGE", f"request headers are larger than {self.limit} bytes"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _ReadOnly:
    """Serve only reads (``GET``, ``HEAD``, CORS preflight) of the wrapped streams app.

    Every stream of a deployment is written by the runtime alone, inside its fenced
    transactions; a write over the Durable Streams protocol could forge inbox messages or
    replies, or delete an entity's history. Writes go through the control plane instead.
    """

    def __init__(self, app: ASGIApp, base_path: str) -> None:
        self.app = app
        self.prefix = base_path + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] not in ("GET", "HEAD", "OPTIONS")
            and (scope["path"] + "/").startswith(self.prefix)
        ):
            response = error_response(
                405,
                "READ_ONLY",
                "streams are read-only here; use the /_entities control plane to change them",
            )
            response.headers["Allow"] = "GET, HEAD, OPTIONS"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Closing:
    """Set when the server begins to shut down (see :class:`_EndOnShutdown`)."""

    def __init__(self) -> None:
        self.closing = False
        self._event: anyio.Event | None = None

    def event(self) -> anyio.Event:
        if self._event is None:  # created lazily: it must belong to the serving event loop
            self._event = anyio.Event()
            if self.closing:
                self._event.set()
        return self._event

    def set(self) -> None:
        self.closing = True
        if self._event is not None:
            self._event.set()


class _EndOnShutdown:
    """End in-flight ``GET`` requests when the server begins to shut down.

    Live reads (SSE tails, long-polls) would otherwise hold a graceful shutdown until its
    timeout and then be killed with an error. A request that has not answered yet gets
    ``503`` (clients retry); a streaming answer is ended cleanly, and readers resume from the
    last offset they saw.
    """

    def __init__(self, app: ASGIApp, closing: _Closing) -> None:
        self.app = app
        self.closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        started = completed = finished = False

        async def tracked(message: Message) -> None:
            nonlocal started, completed
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        async with anyio.create_task_group() as tg:

            async def end_on_shutdown() -> None:
                await self.closing.event().wait()
                tg.cancel_scope.cancel()

            tg.start_soon(end_on_shutdown)
            await self.app(scope, receive, tracked)
            finished = True
            tg.cancel_scope.cancel()
        if finished or completed:
            return
        if not started:
            response = error_response(503, "SHUTTING_DOWN", "the server is shutting down")
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def host_names(options: ServeOptions) -> tuple[str, ...] | None:
    """The ``Host`` names a server run with ``options`` answers for (``None``: any)."""
    if is_loopback(options.host):
        return (*LOOPBACK_NAMES, *options.allowed_hosts)
    if options.allowed_hosts:
        return (*LOOPBACK_NAMES, options.host, *options.allowed_hosts)
    return None


def create_app(
    runtime: Runtime,
    *,
    worker: Worker | None = None,
    token: str | None = None,
    auth: AuthConfig | None = None,
    cors_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] | None = None,
    max_body_bytes: int = 1024 * 1024,
    max_header_bytes: int = 64 * 1024,
    streams: ServerSettings | None = None,
) -> Starlette:
    """The ASGI app: control plane (``/_entities``), streams (``/v1/stream``), console (``/ui/``),
    operations (``/metrics``, ``/healthz``, ``/readyz``: see ``_ops``; ``worker`` is the one
    this process runs, if any, for the readiness check).

    With ``token`` set, every request must carry ``Authorization: Bearer <token>`` (but the
    health checks and the console's static pages); with ``auth``, the token of one of its
    principals, whose grants must allow what the request does (see ``_access``). Cross-origin
    requests to all but the streams are refused unless from one of ``cors_origins``; with
    ``allowed_hosts``, requests for another ``Host`` are refused. Streams are served read-only
    (writes get ``405 READ_ONLY``). Bodies over ``max_body_bytes`` get ``413``, headers (with
    the request target) over ``max_header_bytes`` get ``431``.

    Raises:
        ValueError: both ``token`` and ``auth`` are given.
    """
    if token and auth is not None:
        raise ValueError("give a token or an auth config, not both")
    settings = streams or ServerSettings()
    streams_app = create_streams_app(runtime.store, settings=settings)

    closing = _Closing()
    middleware = [Middleware(_HeaderLimit, limit=max_header_bytes)]
    if allowed_hosts is not None:
        middleware.append(Middleware(HostCheck, names=allowed_hosts))
    middleware.append(
        Middleware(
            CrossSite,
            origins=cors_origins,
            streams_base=settings.base_path,
            streams_origins=settings.cors_origins,
        )
    )
    if token:
        auth = AuthConfig.single_token(token)
    if auth is not None:
        middleware.append(Middleware(Authorize, auth=auth, streams_base=settings.base_path))
    middleware.append(Middleware(_EndOnShutdown, closing=closing))
    otel = tracing.asgi_middleware()
    if otel is not None:  # a span per request (they are no-ops until a provider is set)
        # one span per request: not one per message sent or received (an SSE tail sends many)
        middleware.insert(
            0,
            Middleware(
                otel, exclude_spans=["receive", "send"], tracer_provider=tracing.tracer_provider()
            ),
        )
    routes = [
        *ops_routes(runtime, worker),
        openapi_route(),
        *console_routes(),
        *control_routes(runtime, max_body_bytes=max_body_bytes),
        Mount("/", app=_ReadOnly(streams_app, settings.base_path)),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.begin_shutdown = closing.set
    return app


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` handles SIGINT/SIGTERM itself.

    uvicorn re-raises a captured signal once its server has stopped, which kills the process
    before the embedded worker could drain its in-flight wakes.
    """

    def __init__(self, config: uvicorn.Config, begin_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.begin_shutdown = begin_shutdown

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.begin_shutdown()  # end live reads first, so open connections can close
        await super().shutdown(sockets)


def _bound_port(server: uvicorn.Server, default: int) -> int:
    """The port the server listens on (``--port 0`` picks a free one)."""
    for listener in server.servers:
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    return default


async def _exit_on_signals(server: uvicorn.Server) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if server.should_exit and signum == signal.SIGINT:
                server.force_exit = True  # a second Ctrl-C: stop waiting for connections
            server.should_exit = True


async def serve(
    runtime: Runtime,
    options: ServeOptions,
    *,
    ready: Callable[[str], Awaitable[None] | None] | None = None,
) -> None:
    """Serve HTTP (and, unless ``options.worker`` is false, run a worker) until cancelled or
    until SIGINT/SIGTERM (handled when called from the main thread); then open connections get
    up to ``options.shutdown_seconds`` to finish and in-flight wakes a graceful drain, and this
    returns normally.

    The worker runs on a thread and event loop of its own, over a runtime of its own on the
    same store URL (see :mod:`entities.server._embedded`), so a handler that blocks its loop
    does not hold the HTTP API; over a ``memory://`` store (or a virtual clock) it shares the
    server's loop.

    Raises:
        OSError: the server could not start (e.g. the port is in use).
        Exception: whatever opening the worker thread's store raised.
        RuntimeError: the worker thread failed (it was logged; the server stopped).
    """
    embedded = EmbeddedWorker(runtime) if options.worker and can_embed(runtime) else None
    worker: Worker | None = None
    if embedded is not None:
        worker = await embedded.start()
    elif options.worker:
        worker = runtime.worker()
    try:
        await _serve(runtime, options, worker, embedded, ready)
    finally:
        if embedded is not None:  # stopped already, unless this was cancelled
            embedded.stop()
            with anyio.CancelScope(shield=True):
                await embedded.wait()
    if embedded is not None and embedded.failure is not None:
        raise RuntimeError("the embedded worker failed") from embedded.failure


async def _serve(
    runtime: Runtime,
    options: ServeOptions,
    worker: Worker | None,
    embedded: EmbeddedWorker | None,
    ready: Callable[[str], Awaitable[None] | None] | None,
) -> None:
    """:func:`serve` once its worker (if any) is started: ``embedded``, on its own thread, or
    ``worker`` on this loop."""
    app = create_app(
        runtime,
        worker=worker,
        token=options.token,
        auth=options.auth,
        cors_origins=options.cors_origins,
        allowed_hosts=host_names(options),
        max_body_bytes=options.max_body_bytes,
        max_header_bytes=options.max_header_bytes,
        streams=options.streams,
    )
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        lifespan="off",
        timeout_graceful_shutdown=options.shutdown_seconds,
        # h11's own limit (16 KiB by default) would otherwise cut oversized headers off with a
        # dropped connection before the app can answer 431.
        h11_max_incomplete_event_size=options.max_header_bytes + 16 * 1024,
    )
    server = _Server(config, app.state.begin_shutdown)
    stop = anyio.Event()
    failed: list[str] = []
    async with anyio.create_task_group() as outer:
        if threading.current_thread() is threading.main_thread():
            outer.start_soon(_exit_on_signals, server)
        async with anyio.create_task_group() as tg:
            if embedded is not None:
                tg.start_soon(_run_embedded, embedded, server, stop)
            elif worker is not None:
                tg.start_soon(worker.run, stop)

            async def run_server() -> None:
                try:
                    await server.serve()
                except SystemExit:  # uvicorn's answer to a failed startup (it logged why)
                    failed.append(f"cannot serve on {options.host}:{options.port}")
                finally:
                    stop.set()
                    for listener in server.servers:  # cancelled: uvicorn closed none of them
                        listener.close()

            tg.start_soon(run_server)
            while not server.started:
                if stop.is_set():  # the server could not start
                    break
                await anyio.sleep(0.01)
            if server.started and ready is not None:
                result = ready(f"http://{options.host}:{_bound_port(server, options.port)}")
                if result is not None:
                    await result
        outer.cancel_scope.cancel()
    if failed:
        raise OSError(failed[0])


async def _run_embedded(
    embedded: EmbeddedWorker, server: uvicorn.Server, stop: anyio.Event
) -> None:
    """Until ``stop`` (the server ended), watch the worker thread; then stop it and wait for
    its drain. A worker that ends by itself (it failed: logged) ends the server too."""
    async with anyio.create_task_group() as tg:

        async def on_stop() -> None:
            await stop.wait()
            embedded.stop()

        tg.start_soon(on_stop)
        await embedded.wait()
        if not stop.is_set():  # nothing asked it to end
            server.should_exit = True
        tg.cancel_scope.cancel()


async def serve_metrics(
    runtime: Runtime,
    worker: Worker | None,
    *,
    host: str = "127.0.0.1",
    port: int = 9464,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` alone (for ``entities worker
    --metrics-port``: a worker without the HTTP API) until cancelled; then stop listening.
    ``ready`` gets the base URL once listening.

    Raises:
        OSError: the server could not start (e.g. the port is in use).
    """
    app = Starlette(routes=ops_routes(runtime, worker))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = _Server(config, lambda: None)
    ended = anyio.Event()
    failed: list[str] = []

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):  # stopped by should_exit, not cancelled
                await server.serve()
        except SystemExit:  # uvicorn's answer to a failed startup (it logged why)
            failed.append(f"cannot serve metrics on {host}:{port}")
        finally:
            ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            while not server.started:  # uvicorn has no "started" event to wait on
                if ended.is_set():
                    break
                await anyio.sleep(0.01)
            if server.started and ready is not None:
                ready(f"http://{host}:{_bound_port(server, port)}")
            await ended.wait()
        finally:
            server.should_exit = True  # a clean stop: uvicorn closes its sockets
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await ended.wait()
    if failed:
        raise OSError(failed[0])
