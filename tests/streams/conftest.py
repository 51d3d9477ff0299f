"""Backend-parametrised fixtures: every contract test runs against every store backend
(:mod:`tests._stores`); the tests themselves never name a backend. Where no PostgreSQL server
answers its params are skipped with the reason, or fail under ``ENTITIES_REQUIRE_POSTGRES=1``
(see :mod:`tests._postgres`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import streams

PERSISTENT_BACKENDS = ["sqlite"]


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[streams.Store]:
    """An open, empty store; closed (and, for SQLite, flushed) after the test."""
    async with streams.open_store(store_url) as opened:
        yield opened
