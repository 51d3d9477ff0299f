"""Backend-parametrised fixtures: every contract test runs against every store backend
(:mod:`tests._stores`); the tests themselves never name a backend. Where no PostgreSQL server
answers its params are skipped with the reason, or fail under ``ENTITIES_REQUIRE_POSTGRES=1``
(see :mod:`tests._postgres`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import streams
from tests._stores import BACKENDS, drop_store, make_store_url

PERSISTENT_BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name this test runs against."""
    return str(request.param)


@pytest.fixture
async def store_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh store URL for :func:`backend` (a new SQLite file under ``tmp_path``, a new
    PostgreSQL schema dropped after the test)."""
    url = make_store_url(backend, tmp_path)
    yield url
    await drop_store(url)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[streams.Store]:
    """An open, empty store; closed (and, for SQLite, flushed) after the test."""
    async with streams.open_store(store_url) as opened:
        yield opened
