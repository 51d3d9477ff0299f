"""Fixtures for entity tests (``store_url``, once per backend, is in ``tests/conftest.py``). A
test that opens one store twice (a restart, two processes) takes ``shared_store_url`` instead:
the backends whose every ``open_store`` of a URL is the same store (not memory, where each open
is a new, private world)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests._stores import BACKENDS, drop_store, make_store_url

SHARED_BACKENDS: list[Any] = [p for p in BACKENDS if p.id != "memory"]


@pytest.fixture(params=SHARED_BACKENDS)
async def shared_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Like :func:`store_url`, over a backend that processes share (SQLite, PostgreSQL)."""
    url = make_store_url(str(request.param), tmp_path)
    yield url
    await drop_store(url)
