"""Backend-parametrised fixtures: every contract test runs against every store backend.

A backend joins the suite by adding one entry to :data:`BACKENDS` and one branch to
:func:`make_store_url`; the tests themselves never name a backend. PostgreSQL joins automatically
when ``STREAMS_TEST_POSTGRES_URL`` points at a database the suite may own (each test must get an
empty store, e.g. a fresh schema per test chosen by the backend's URL).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import streams

POSTGRES_URL_ENV = "STREAMS_TEST_POSTGRES_URL"

BACKENDS: list[Any] = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
]
if os.environ.get(POSTGRES_URL_ENV):
    BACKENDS.append(pytest.param("postgres", id="postgres", marks=pytest.mark.postgres))

PERSISTENT_BACKENDS = ["sqlite"]


def make_store_url(backend: str, directory: Path) -> str:
    """The URL of an empty store of kind ``backend`` that lives under ``directory``."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{directory.resolve() / 'streams.db'}"
    if backend == "postgres":
        return os.environ[POSTGRES_URL_ENV]
    raise ValueError(f"unknown backend {backend!r}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name this test runs against."""
    return str(request.param)


@pytest.fixture
def store_url(backend: str, tmp_path: Path) -> str:
    """A fresh store URL for :func:`backend` (a new SQLite file under ``tmp_path``)."""
    return make_store_url(backend, tmp_path)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[streams.Store]:
    """An open, empty store; closed (and, for SQLite, flushed) after the test."""
    async with streams.open_store(store_url) as opened:
        yield opened
