"""The PostgreSQL backend's schema, its versioned migrations and its URL options.

Migrations are numbered; ``schema_version`` records each one applied. :func:`migrate` runs them in
one transaction that first takes a transaction-scoped advisory lock keyed by the schema name, so
any number of processes may open a store on the same database at once: one migrates, the others
wait and then find nothing left to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._errors import BackendUnavailable

__all__ = ["MIGRATIONS", "PostgresUrl", "advisory_key", "migrate", "parse_url", "quote_ident"]


def _speculate_function() -> str:
    """Migration 5: ``speculate(locks, expected stream rows, expected side-table values,
    writes, channel, payloads)``: take the locks, then (with a snapshot taken after them)
    compare every expected row with the stored one, and write and notify only if all match;
    ``true`` if it wrote. Called alone, it is a transaction of its own. A stream column
    added later replaces this function (DROP and CREATE), as it does ``lock_and_read``."""
    cols = [
        ("id", "BIGINT"), ("path", "TEXT"), ("content_type", "TEXT"),
        ("created_at", "DOUBLE PRECISION"), ("last_access", "DOUBLE PRECISION"),
        ("length", "BIGINT"), ("ttl_seconds", "BIGINT"), ("expires_at", "DOUBLE PRECISION"),
        ("closed", "BOOLEAN"), ("closed_by", "TEXT"), ("fork_parent", "BIGINT"),
        ("fork_position", "BIGINT"), ("last_stream_seq", "TEXT"), ("deleted", "BOOLEAN"),
        ("fork_count", "BIGINT"), ("fork_sub_offset", "BIGINT"), ("retained_from", "BIGINT"),
    ]  # fmt: skip
    names = [name for name, _type in cols]
    expected = ", ".join(f"e_{n} {t}[]" for n, t in cols)
    written = ", ".join(f"w_{n} {t}[]" for n, t in cols)
    stored = ", ".join(f"s.{n}" for n in names[1:])
    compared = ", ".join(f"e.{n}" for n in names[1:])
    updated = ", ".join(
        f"{n}=excluded.{n}"
        for n in ("last_access", "length", "closed", "closed_by", "last_stream_seq", "deleted",
                  "fork_count", "retained_from")
    )  # fmt: skip
    return f"""
    CREATE FUNCTION speculate(
        locks BIGINT[], {expected},
        k_namespace TEXT[], k_key TEXT[], k_value BYTEA[],
        {written},
        m_stream BIGINT[], m_position BIGINT[], m_data BYTEA[],
        p_namespace TEXT[], p_key TEXT[], p_value BYTEA[],
        d_namespace TEXT[], d_key TEXT[],
        channel TEXT, payloads TEXT[]
    )
    RETURNS BOOLEAN
    LANGUAGE plpgsql VOLATILE AS $fn$
    #variable_conflict use_column
    DECLARE
        matched BIGINT;
    BEGIN
        PERFORM count(pg_advisory_xact_lock(k)) FROM unnest(locks) AS k;
        IF cardinality(e_id) > 0 THEN
            SELECT count(*) INTO matched FROM (
                SELECT s.id FROM streams s
                JOIN unnest({", ".join(f"e_{n}" for n in names)}) AS e({", ".join(names)})
                    ON s.id = e.id
                WHERE ROW({stored}) IS NOT DISTINCT FROM ROW({compared})
                FOR UPDATE OF s
            ) AS same;
            IF matched <> cardinality(e_id) THEN
                RETURN false;
            END IF;
        END IF;
        IF cardinality(k_key) > 0 AND EXISTS (
            SELECT 1 FROM unnest(k_namespace, k_key, k_value) AS w(namespace, key, value)
            LEFT JOIN kv ON kv.namespace = w.namespace COLLATE "C" AND kv.key = w.key COLLATE "C"
            WHERE kv.value IS DISTINCT FROM w.value
        ) THEN
            RETURN false;
        END IF;
        IF cardinality(w_id) > 0 THEN
            INSERT INTO streams ({", ".join(names)})
                SELECT * FROM unnest({", ".join(f"w_{n}" for n in names)})
                ON CONFLICT (id) DO UPDATE SET {updated};
        END IF;
        IF cardinality(m_stream) > 0 THEN
            INSERT INTO messages (stream_id, position, data)
                SELECT * FROM unnest(m_stream, m_position, m_data);
        END IF;
        IF cardinality(p_key) > 0 THEN
            INSERT INTO kv (namespace, key, value)
                SELECT * FROM unnest(p_namespace, p_key, p_value)
                ON CONFLICT (namespace, key) DO UPDATE SET value=excluded.value;
        END IF;
        IF cardinality(d_key) > 0 THEN
            DELETE FROM kv USING unnest(d_namespace, d_key) AS d(namespace, key)
                WHERE kv.namespace = d.namespace COLLATE "C" AND kv.key = d.key COLLATE "C";
        END IF;
        PERFORM pg_notify(channel, p) FROM unnest(payloads) AS p;
        RETURN true;
    END
    $fn$;
    """


_SPECULATE = _speculate_function()


MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE SEQUENCE stream_ids;
    CREATE TABLE streams (
        id BIGINT PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        content_type TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        last_access DOUBLE PRECISION NOT NULL,
        length BIGINT NOT NULL,
        ttl_seconds BIGINT,
        expires_at DOUBLE PRECISION,
        closed BOOLEAN NOT NULL,
        closed_by TEXT,
        fork_parent BIGINT,
        fork_position BIGINT NOT NULL,
        last_stream_seq TEXT,
        deleted BOOLEAN NOT NULL,
        fork_count BIGINT NOT NULL,
        fork_sub_offset BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE messages (
        stream_id BIGINT NOT NULL,
        position BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (stream_id, position)
    );
    CREATE TABLE producers (
        stream_id BIGINT NOT NULL,
        producer_id TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        length BIGINT NOT NULL,
        PRIMARY KEY (stream_id, producer_id)
    );
    CREATE TABLE kv (
        namespace TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        value BYTEA NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    """,
    # version 2: room on every page for updated rows, so the updates that dominate (an entity's
    # record twice per wake, a stream's length on every append) stay heap-only (no index entry,
    # less to vacuum). Applies to pages written from now on.
    """
    ALTER TABLE kv SET (fillfactor = 70);
    ALTER TABLE streams SET (fillfactor = 70);
    """,
    # version 3: prefix truncation (the earliest retained position)
    """
    ALTER TABLE streams ADD COLUMN retained_from BIGINT NOT NULL DEFAULT 0;
    """,
    # version 4: a group commit's locks and reads in one round trip (its columns are the
    # streams table's: a migration adding one replaces it, DROP and CREATE)
    """
    CREATE FUNCTION lock_and_read(locks BIGINT[], paths TEXT[], namespaces TEXT[], keys TEXT[])
    RETURNS TABLE (
        id BIGINT, path TEXT, content_type TEXT, created_at DOUBLE PRECISION,
        last_access DOUBLE PRECISION, length BIGINT, ttl_seconds BIGINT,
        expires_at DOUBLE PRECISION, closed BOOLEAN, closed_by TEXT, fork_parent BIGINT,
        fork_position BIGINT, last_stream_seq TEXT, deleted BOOLEAN, fork_count BIGINT,
        fork_sub_offset BIGINT, retained_from BIGINT,
        kv_namespace TEXT, kv_key TEXT, kv_value BYTEA
    )
    LANGUAGE plpgsql VOLATILE AS $fn$
    #variable_conflict use_column
    BEGIN
        PERFORM count(pg_advisory_xact_lock(k)) FROM unnest(locks) AS k;
        RETURN QUERY
            WITH s AS (
                SELECT st.* FROM streams st WHERE st.path = ANY(paths) ORDER BY st.id FOR UPDATE
            )
            SELECT s.id, s.path, s.content_type, s.created_at, s.last_access, s.length,
                s.ttl_seconds, s.expires_at, s.closed, s.closed_by, s.fork_parent,
                s.fork_position, s.last_stream_seq, s.deleted, s.fork_count, s.fork_sub_offset,
                s.retained_from, NULL::text, NULL::text, NULL::bytea
            FROM s
            UNION ALL
            SELECT NULL::bigint, NULL::text, NULL::text, NULL::float8, NULL::float8,
                NULL::bigint, NULL::bigint, NULL::float8, NULL::boolean, NULL::text,
                NULL::bigint, NULL::bigint, NULL::text, NULL::boolean, NULL::bigint,
                NULL::bigint, NULL::bigint, kv.namespace::text, kv.key::text, kv.value
            FROM kv JOIN unnest(namespaces, keys) AS w(namespace, key)
                ON kv.namespace = w.namespace COLLATE "C" AND kv.key = w.key COLLATE "C";
    END
    $fn$;
    """,
    # version 5: a speculative group commit (see ``_postgres_speculate``)
    _SPECULATE,
]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # fullmatch: no trailing newline


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit advisory-lock key (the same in every process)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class PostgresUrl:
    """A ``postgresql://`` URL split into what asyncpg takes and the store's own options."""

    dsn: str
    schema: str

    @property
    def search_path(self) -> str:
        return quote_ident(self.schema)

    @property
    def channel(self) -> str:
        """The NOTIFY channel of this schema (at most 63 bytes, PostgreSQL's limit)."""
        name = f"streams_{self.schema}"
        if len(name.encode()) <= 63:
            return name
        return "streams_" + hashlib.blake2b(self.schema.encode(), digest_size=16).hexdigest()


def parse_url(url: str) -> PostgresUrl:
    """Split ``postgresql://user@host:port/db?schema=NAME`` (or ``?search_path=NAME``).

    Raises:
        BackendUnavailable: the schema name is not a plain identifier.
    """
    parts = urlsplit(url)
    schema = "public"
    kept: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in {"schema", "search_path"}:
            schema = value.split(",", 1)[0].strip()
        else:
            kept.append((name, value))
    if not _IDENT.fullmatch(schema):
        raise BackendUnavailable(
            f"PostgreSQL schema name {schema!r} must be a plain identifier "
            "(letters, digits, underscores; at most 63 characters)"
        )
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    dsn = urlunsplit((scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))
    return PostgresUrl(dsn=dsn, schema=schema)


async def migrate(conn: Any, schema: str) -> int:
    """Create ``schema`` if missing and apply every pending migration; return the version.

    Safe to run from many processes at once (an advisory lock serialises them).
    """
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1)", advisory_key("streams-migrate", schema)
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        table = f"{quote_ident(schema)}.schema_version"
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
        version = int(current)
        await conn.execute(f"SET LOCAL search_path TO {quote_ident(schema)}")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await conn.execute(script)
            await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", number)
            version = number
    return version
