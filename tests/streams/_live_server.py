"""A real uvicorn serving ``streams.server`` on 127.0.0.1 (free port) in a background thread
(:func:`tests._live.serving_in_thread`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streams.server import ServerSettings, serve_app
from tests import _postgres
from tests._live import serving_in_thread

# the backends a module-scoped live server runs over (postgres: where a server answers)
SERVER_BACKENDS: list[Any] = [
    "memory",
    "sqlite",
    pytest.param("postgres", marks=_postgres.marks()),
]

TEST_SETTINGS = ServerSettings(
    long_poll_timeout_s=0.5,
    sse_max_duration_s=5.0,
    sse_keepalive_s=1.0,
    max_body_bytes=64 * 1024,
    read_max_bytes=4096,
)


@dataclass(frozen=True)
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    prefix: str = ""  # stream paths of one test live under this prefix

    def scoped(self, prefix: str) -> LiveServer:
        return LiveServer(self.url, prefix)

    def path(self, name: str) -> str:
        """The URL path of stream ``name`` (what Stream-Forked-From takes)."""
        return f"/v1/stream/{self.prefix}/{name}" if self.prefix else f"/v1/stream/{name}"

    def stream(self, name: str) -> str:
        return self.url + self.path(name)


@contextlib.contextmanager
def backend_db(backend: str, directory: Path) -> Iterator[str]:
    """A fresh store URL of kind ``backend`` (a PostgreSQL schema is dropped afterwards)."""
    if backend == "memory":
        yield "memory://"
    elif backend == "sqlite":
        yield f"sqlite:///{directory / 'streams.db'}"
    else:
        _postgres.check()
        url = _postgres.fresh_url()
        try:
            yield url
        finally:
            _postgres.drop_schema_sync(url)


@contextlib.contextmanager
def running_server(db: str, settings: ServerSettings = TEST_SETTINGS) -> Iterator[LiveServer]:
    """Serve the store at ``db`` until the block exits; the store opens inside the server."""
    with serving_in_thread(serve_app(db, settings), lifespan="on") as url:
        yield LiveServer(url)
