"""Fixtures shared by every test package: a test that takes ``store_url`` runs once per store
backend (memory, SQLite, PostgreSQL where a server answers; see :mod:`tests._stores`), with a
fresh store each time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests._stores import BACKENDS, drop_store, make_store_url


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
