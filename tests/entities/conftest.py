"""Backend-parametrised fixtures for entity tests: a test that takes ``store_url`` runs once per
store backend (memory, SQLite, PostgreSQL where a server answers; see :mod:`tests._stores`), with
a fresh store each time. A test that opens one store twice (a restart, two processes) takes
``shared_store_url`` instead: the backends whose every ``open_store`` of a URL is the same store
(not memory, where each open is a new, private world)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests._stores import BACKENDS, drop_store, make_store_url

SHARED_BACKENDS: list[Any] = [p for p in BACKENDS if p.id != "memory"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend this test runs against."""
    return str(request.param)


@pytest.fixture
async def store_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh store URL for :func:`backend` (a new SQLite file under ``tmp_path``, a new
    PostgreSQL schema dropped after the test)."""
    url = make_store_url(backend, tmp_path)
    yield url
    await drop_store(url)


@pytest.fixture(params=SHARED_BACKENDS)
async def shared_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Like :func:`store_url`, over a backend that processes share (SQLite, PostgreSQL)."""
    url = make_store_url(str(request.param), tmp_path)
    yield url
    await drop_store(url)
