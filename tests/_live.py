"""A real uvicorn serving an ASGI app on 127.0.0.1 (a free port), stopped when the block exits.

The one way tests start a live HTTP server in-process (``tests/streams``, ``tests/entities``).
It comes in two forms, because an app may only run on the event loop that owns its objects:

* :func:`serving_in_thread` (a plain ``with``): uvicorn runs in a background thread on its own
  event loop. For apps that hold nothing of the test's loop: the streams server
  (``streams.server.serve_app`` opens its store in the lifespan), the fake model providers.
* :func:`serving` (``async with``): uvicorn runs as a task on the test's running loop. For apps
  built over objects of that loop, e.g. ``entities.server.create_app(runtime)``: the runtime's
  store (its connections, its wake-up signals) belongs to the loop it was opened on.

Both yield the base URL (``http://127.0.0.1:PORT``). Servers that must be separate processes (the
``entities serve`` CLI, servers a test SIGKILLs) are started with ``tests.entities._support``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn

START_SECONDS = 20.0  # how long uvicorn may take to listen, and (thread) to stop

# what every test server shares; a caller's keyword arguments override these
DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,  # a free port, read back from the bound socket
    "log_level": "warning",
    "lifespan": "off",
    "timeout_graceful_shutdown": 1,
}


def _server(app: Any, options: dict[str, Any]) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, **{**DEFAULTS, **options}))


def _url(server: uvicorn.Server) -> str:
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serving_in_thread(app: Any, **options: Any) -> Iterator[str]:
    """Serve ``app`` from a background thread (own event loop) until the block exits.

    ``options`` are ``uvicorn.Config`` arguments (e.g. ``lifespan="on"``).

    Raises:
        RuntimeError: uvicorn did not start, or did not stop, within :data:`START_SECONDS`.
    """
    server = _server(app, options)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield _url(server)
    finally:
        server.should_exit = True
        thread.join(timeout=START_SECONDS)
        if thread.is_alive():
            raise RuntimeError("uvicorn did not stop")


@contextlib.asynccontextmanager
async def serving(app: Any, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` as a task on the running event loop until the block exits (open
    connections then get ``timeout_graceful_shutdown`` seconds to finish).

    A plain task rather than a task group, so a pytest-asyncio fixture may enter and exit this
    in different tasks.

    Raises:
        RuntimeError: uvicorn exited early, or did not start within :data:`START_SECONDS`.
    """
    server = _server(app, options)
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + START_SECONDS
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.01)
        yield _url(server)
    finally:
        server.should_exit = True
        await task
