"""Store backends for tests: one name per backend, and a fresh, empty store URL of each kind.

A backend joins every backend-parametrised suite (``tests/streams``, ``tests/entities``) by
adding one entry to :data:`BACKENDS` and one branch to :func:`make_store_url`. PostgreSQL joins
when a server answers (see :mod:`tests._postgres`); each test gets a fresh schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import _postgres

BACKENDS: list[Any] = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=_postgres.marks()),
]


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
