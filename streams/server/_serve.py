"""Running the server with uvicorn over a store opened from a URL."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import Receive, Scope, Send

from .. import StreamsError, open_store
from ._app import StreamsApp, create_app
from ._settings import ServerSettings

__all__ = ["serve", "serve_app"]

logger = logging.getLogger("streams.server")


class _StoreApp:
    """Opens the store at startup (inside the server's event loop) and closes it at shutdown.

    It needs the ASGI lifespan (uvicorn's default, ``lifespan="on"``).
    """

    def __init__(self, url: str, settings: ServerSettings) -> None:
        self.url = url
        self.settings = settings
        self.app: StreamsApp | None = None

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        async with open_store(self.url) as store:
            app = self.app = create_app(store, settings=self.settings)
            try:
                yield
            finally:
                self.app = None
                await app.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            assert message["type"] == "lifespan.startup"
            try:
                running = self._running()
                await running.__aenter__()
            except StreamsError as exc:  # a full disk, say: one line (uvicorn logs it), exit
                failed = f"could not open the store {self.url}: {exc}"
                await send({"type": "lifespan.startup.failed", "message": failed})
                return
            except Exception as exc:
                logger.exception("could not open the store %s", self.url)
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await running.__aexit__(None, None, None)
            await send({"type": "lifespan.shutdown.complete"})
            return
        if self.app is None:
            raise RuntimeError("the store is not open: run this app with the ASGI lifespan on")
        await self.app(scope, receive, send)


def serve_app(db: str, settings: ServerSettings | None = None) -> _StoreApp:
    """An ASGI app that opens the store at ``db`` when the server starts (for ``uvicorn``)."""
    return _StoreApp(db, settings or ServerSettings())


def serve(
    db: str,
    *,
    host: str = "127.0.0.1",
    port: int = 4437,
    settings: ServerSettings | None = None,
    log_level: str = "info",
) -> None:
    """Serve the store at ``db`` over HTTP until interrupted (blocks)."""
    config = uvicorn.Config(
        serve_app(db, settings),
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run()
