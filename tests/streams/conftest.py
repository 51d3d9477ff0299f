"""Backend-parametrised fixtures: every contract test runs against every store backend.

A backend joins the suite by adding one entry to :data:`BACKENDS` and one branch to
:func:`make_store_url`; the tests themselves never name a backend. PostgreSQL joins when a server
answers at ``ENTITIES_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``);
each test gets a fresh schema, dropped afterwards. Where no server answers its params are skipped
with the reason, or fail under ``ENTITIES_REQUIRE_POSTGRES=1`` (see :mod:`tests._postgres`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import streams
from tests import _postgres

BACKENDS: list[Any] = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=_postgres.marks()),
]

PERSISTENT_BACKENDS = ["sqlite"]


def make_store_url(backend: str, directory: Path) -> str:
    """The URL of an empty store of kind ``backend`` that lives under ``directory`` (SQLite) or in
    a new schema (PostgreSQL; drop it with :func:`drop_store`)."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{directory.resolve() / 'streams.db'}"
    if backend == "postgres":
        _postgres.check()
        return _postgres.fresh_url()
    raise ValueError(f"unknown backend {backend!r}")


async def drop_store(url: str) -> None:
    """Remove what :func:`make_store_url` created outside ``directory`` (a PostgreSQL schema)."""
    if url.startswith("postgresql://"):
        await _postgres.drop_schema(url)


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
