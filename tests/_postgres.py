"""The PostgreSQL test server: where it is, whether it answers, a fresh schema per test.

Tests use the server at ``ENTITIES_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Where nothing answers there, PostgreSQL tests are
skipped with the reason, unless ``ENTITIES_REQUIRE_POSTGRES=1`` (CI), under which they fail.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

URL_ENV = "ENTITIES_TEST_POSTGRES_URL"
REQUIRE_ENV = "ENTITIES_REQUIRE_POSTGRES"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "0") == "1"


@functools.cache
def unavailable_reason() -> str | None:
    """``None`` when the test server answers, else why not."""
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - asyncpg is in the dev extra
        return f"asyncpg is not installed ({exc})"

    async def probe() -> None:
        conn = await asyncpg.connect(server_url(), timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"no PostgreSQL server answers at {server_url()} ({type(exc).__name__}: {exc})"
    return None


def marks() -> list[Any]:
    """Marks for a postgres test or param: skip where no server answers (unless required)."""
    reason = unavailable_reason()
    found: list[Any] = [pytest.mark.postgres]
    if reason is not None and not required():
        found.append(pytest.mark.skip(reason=f"{reason}; set {URL_ENV} to run PostgreSQL tests"))
    return found


def check() -> None:
    """Fail (``ENTITIES_REQUIRE_POSTGRES=1``) or skip when no server answers."""
    reason = unavailable_reason()
    if reason is None:
        return
    if required():
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def fresh_url() -> str:
    """The test server's URL with a new, unused schema (created when a store opens it)."""
    parts = urlsplit(server_url())
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in {"schema", "search_path"}]
    query.append(("schema", f"t_{uuid.uuid4().hex[:20]}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def drop_schema(url: str) -> None:
    """Drop the schema ``url`` names (and everything in it)."""
    import asyncpg

    from streams._backends._postgres_schema import parse_url, quote_ident

    parsed = parse_url(url)
    assert parsed.schema != "public"
    conn = await asyncpg.connect(parsed.dsn, timeout=5)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(parsed.schema)} CASCADE")
    finally:
        await conn.close()


def drop_schema_sync(url: str) -> None:
    asyncio.run(drop_schema(url))
