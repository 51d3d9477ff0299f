"""SQL and record plumbing of the PostgreSQL backend: row <-> record conversion, the loader a
group's transaction validates against (everything it reads it locks), the read-side loader, and
persisting a group's effects in a handful of statements."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import orjson

from ._engine import Effects, Loader, ProducerRecord, StreamRecord

__all__ = [
    "COLUMNS",
    "GroupLoader",
    "ReadLoader",
    "columns",
    "fetch",
    "persist",
    "to_record",
    "write_statement",
]

COLUMNS = (
    "id, path, content_type, created_at, last_access, length, ttl_seconds, expires_at, closed, "
    "closed_by, fork_parent, fork_position, last_stream_seq, deleted, fork_count, fork_sub_offset, "
    "retained_from"
)
_STREAM_TYPES = (
    "bigint", "text", "text", "float8", "float8", "bigint", "bigint", "float8", "boolean", "text",
    "bigint", "bigint", "text", "boolean", "bigint", "bigint", "bigint",
)  # fmt: skip


def _upsert_streams(first: int) -> str:
    """Every changed stream row of a group (one array per column, from ``$first``)."""
    arrays = ", ".join(f"${n}::{t}[]" for n, t in enumerate(_STREAM_TYPES, start=first))
    return (
        f"INSERT INTO streams ({COLUMNS}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (id) DO UPDATE SET last_access=excluded.last_access, "
        "length=excluded.length, closed=excluded.closed, closed_by=excluded.closed_by, "
        "last_stream_seq=excluded.last_stream_seq, deleted=excluded.deleted, "
        "fork_count=excluded.fork_count, retained_from=excluded.retained_from"
    )


def _insert_messages(first: int) -> str:
    return (
        "INSERT INTO messages (stream_id, position, data) "
        f"SELECT * FROM unnest(${first}::bigint[], ${first + 1}::bigint[], ${first + 2}::bytea[])"
    )


def _put_kv(first: int) -> str:
    return (
        "INSERT INTO kv (namespace, key, value) "
        f"SELECT * FROM unnest(${first}::text[], ${first + 1}::text[], ${first + 2}::bytea[]) "
        "ON CONFLICT (namespace, key) DO UPDATE SET value=excluded.value"
    )


def _drop_kv(first: int) -> str:
    return (
        f"DELETE FROM kv USING unnest(${first}::text[], ${first + 1}::text[]) AS d(namespace, key) "
        'WHERE kv.namespace = d.namespace COLLATE "C" AND kv.key = d.key COLLATE "C"'
    )


_WRITES = (
    (_upsert_streams, len(_STREAM_TYPES)), (_insert_messages, 3), (_put_kv, 3), (_drop_kv, 2),
)  # fmt: skip


@functools.cache
def write_statement(parts: tuple[bool, bool, bool, bool]) -> str:
    """The statement writing a group's common effects (stream rows, new messages, side-table
    puts, side-table deletes: those of ``parts`` that are ``True``, in that order, their arrays
    numbered on), as one round trip: data-modifying ``WITH`` clauses when there are several
    (they touch disjoint rows: a side-table key is either put or deleted, never both)."""
    statements: list[str] = []
    first = 1
    for wanted, (build, count) in zip(parts, _WRITES, strict=True):
        if wanted:
            statements.append(build(first))
            first += count
    if len(statements) == 1:
        return statements[0]
    return "WITH " + ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(statements)) + " SELECT 1"


# a group's locks, the stream rows it locks and the side-table values it reads (the schema's
# ``lock_and_read`` function, migration 4)
_LOCK_AND_READ = "SELECT * FROM lock_and_read($1::bigint[], $2::text[], $3::text[], $4::text[])"


def to_record(row: Any) -> StreamRecord:
    closed_by = row["closed_by"]
    return StreamRecord(
        id=int(row["id"]),
        path=str(row["path"]),
        content_type=str(row["content_type"]),
        created_at=float(row["created_at"]),
        last_access=float(row["last_access"]),
        length=int(row["length"]),
        ttl_seconds=None if row["ttl_seconds"] is None else int(row["ttl_seconds"]),
        expires_at=None if row["expires_at"] is None else float(row["expires_at"]),
        closed=bool(row["closed"]),
        closed_by=None if closed_by is None else tuple(orjson.loads(closed_by)),
        fork_parent=None if row["fork_parent"] is None else int(row["fork_parent"]),
        fork_position=int(row["fork_position"]),
        last_stream_seq=row["last_stream_seq"],
        deleted=bool(row["deleted"]),
        fork_count=int(row["fork_count"]),
        fork_sub_offset=int(row["fork_sub_offset"]),
        retained_from=int(row["retained_from"]),
    )


def from_record(r: StreamRecord) -> tuple[object, ...]:
    closed_by = None if r.closed_by is None else orjson.dumps(list(r.closed_by)).decode()
    return (r.id, r.path, r.content_type, r.created_at, r.last_access, r.length, r.ttl_seconds,
            r.expires_at, r.closed, closed_by, r.fork_parent, r.fork_position,
            r.last_stream_seq, r.deleted, r.fork_count, r.fork_sub_offset,
            r.retained_from)  # fmt: skip


def columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """``rows`` as one list per column: the arrays of an ``unnest(...)`` statement."""
    return [list(column) for column in zip(*rows, strict=True)]


async def fetch(conn: Any, sql: str, *args: Any) -> list[Any]:
    return list(await conn.fetch(sql, *args))


class GroupLoader(Loader):
    """Records as one group's transaction sees them: earlier batches' effects, then the rows it
    locked. Everything it reads it reads ``FOR UPDATE``."""

    def __init__(self, conn: Any, ids: list[int]) -> None:
        self.conn = conn
        self.ids = ids  # stream ids reserved from the sequence for this group's creates
        self.effects = Effects()
        self.by_path: dict[str, StreamRecord | None] = {}  # from effects (None: purged)
        self.rows: dict[str, StreamRecord | None] = {}  # locked rows by path (None: absent)
        self.rows_by_id: dict[int, StreamRecord] = {}
        self.producers: dict[tuple[int, str], ProducerRecord | None] = {}
        self.kv_rows: dict[tuple[str, str], bytes | None] = {}

    def merge(self, effects: Effects) -> None:
        if effects.purged:  # a scan of the group's paths: only for the rare purge
            purged_paths = [
                path
                for path, record in self.by_path.items()
                if record is not None and record.id in effects.purged
            ]
            for path in purged_paths:
                self.by_path[path] = None
            for sid in effects.purged:
                row = self.rows_by_id.get(sid)
                if row is not None:
                    self.by_path[row.path] = None
        self.effects.merge(effects)
        for record in effects.streams.values():
            self.by_path[record.path] = record

    def _keep(self, record: StreamRecord) -> StreamRecord:
        self.rows[record.path] = record
        self.rows_by_id[record.id] = record
        return record

    async def stream(self, path: str) -> StreamRecord | None:
        if path in self.by_path:
            return self.by_path[path]
        if path not in self.rows:
            await self.prefetch([path])
        record = self.rows[path]
        return None if record is None or record.id in self.effects.purged else record

    async def stream_by_id(self, stream_id: int) -> StreamRecord | None:
        if stream_id in self.effects.purged:
            return None
        if stream_id in self.effects.streams:
            return self.effects.streams[stream_id]
        record = self.rows_by_id.get(stream_id)
        if record is None:
            row = await self.conn.fetchrow(
                f"SELECT {COLUMNS} FROM streams WHERE id=$1 FOR UPDATE", stream_id
            )
            if row is None:
                return None
            record = self._keep(to_record(row))
        if self.by_path.get(record.path, record) is None:
            return None
        return record

    async def producer(self, stream_id: int, producer_id: str) -> ProducerRecord | None:
        key = (stream_id, producer_id)
        if key in self.effects.producers:
            return self.effects.producers[key]
        if key not in self.producers:
            await self.prefetch_producers([key])
        return self.producers[key]

    def new_stream_id(self) -> int:
        return self.ids.pop()

    async def kv(self, namespace: str, key: str) -> bytes | None:
        if (namespace, key) in self.effects.kv:
            return self.effects.kv[(namespace, key)]
        if (namespace, key) not in self.kv_rows:
            await self.prefetch_kv([(namespace, key)])
        return self.kv_rows[(namespace, key)]

    async def prefetch(self, paths: Sequence[str]) -> None:
        wanted = sorted(set(paths) - self.rows.keys())
        if not wanted:
            return
        rows = await self.conn.fetch(
            f"SELECT {COLUMNS} FROM streams WHERE path = ANY($1::text[]) ORDER BY id FOR UPDATE",
            wanted,
        )
        self._found(wanted, rows, [], [])

    def _found(
        self,
        paths: Sequence[str],
        stream_rows: Sequence[Any],
        keys: Sequence[tuple[str, str]],
        kv_rows: Sequence[tuple[str, str, bytes]],
    ) -> None:
        """Record what a prefetch of ``paths`` and ``keys`` found (the rest is absent)."""
        for path in paths:
            self.rows[path] = None
        for row in stream_rows:
            self._keep(to_record(row))
        for wanted in keys:
            self.kv_rows[wanted] = None
        for namespace, key, value in kv_rows:
            self.kv_rows[(str(namespace), str(key))] = bytes(value)

    async def lock_and_read(
        self, locks: Sequence[int], paths: Sequence[str], keys: Sequence[tuple[str, str]]
    ) -> None:
        """Take the transaction's advisory ``locks`` (sorted), then lock and read the stream
        rows of ``paths`` and read the side-table values of ``keys``: one round trip (the
        ``lock_and_read`` function reads after the locks are held, with a fresh snapshot)."""
        wanted = sorted(set(paths) - self.rows.keys())
        wanted_kv = sorted(set(keys) - self.kv_rows.keys())
        rows = await self.conn.fetch(
            _LOCK_AND_READ,
            list(locks),
            wanted,
            [k[0] for k in wanted_kv],
            [k[1] for k in wanted_kv],
        )
        streams = [row for row in rows if row["kv_namespace"] is None]
        values = [
            (row["kv_namespace"], row["kv_key"], row["kv_value"])
            for row in rows
            if row["kv_namespace"] is not None
        ]
        self._found(wanted, streams, wanted_kv, values)

    async def prefetch_producers(self, keys: Sequence[tuple[int, str]]) -> None:
        wanted = sorted(set(keys) - self.producers.keys())
        if not wanted:
            return
        rows = await self.conn.fetch(
            "SELECT p.stream_id, p.producer_id, p.epoch, p.seq, p.length FROM producers p "
            "JOIN unnest($1::bigint[], $2::text[]) AS w(stream_id, producer_id) "
            "ON p.stream_id = w.stream_id AND p.producer_id = w.producer_id",
            [k[0] for k in wanted],
            [k[1] for k in wanted],
        )
        for key in wanted:
            self.producers[key] = None
        for row in rows:
            record = ProducerRecord(int(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4]))
            self.producers[(record.stream_id, record.producer_id)] = record

    async def prefetch_kv(self, keys: Sequence[tuple[str, str]]) -> None:
        wanted = sorted(set(keys) - self.kv_rows.keys())
        if not wanted:
            return
        rows = await self.conn.fetch(
            "SELECT kv.namespace, kv.key, kv.value FROM kv "
            "JOIN unnest($1::text[], $2::text[]) AS w(namespace, key) "
            'ON kv.namespace = w.namespace COLLATE "C" AND kv.key = w.key COLLATE "C"',
            [k[0] for k in wanted],
            [k[1] for k in wanted],
        )
        self._found([], [], wanted, [(row[0], row[1], row[2]) for row in rows])


class ReadLoader:
    """Fork ancestors for a read plan, from a pooled connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def stream(self, path: str) -> StreamRecord | None:
        row = await self.conn.fetchrow(f"SELECT {COLUMNS} FROM streams WHERE path=$1", path)
        return None if row is None else to_record(row)

    async def stream_by_id(self, stream_id: int) -> StreamRecord | None:
        row = await self.conn.fetchrow(f"SELECT {COLUMNS} FROM streams WHERE id=$1", stream_id)
        return None if row is None else to_record(row)


async def persist(conn: Any, effects: Effects) -> None:
    if effects.purged:
        ids = sorted(effects.purged)
        await conn.execute("DELETE FROM messages WHERE stream_id = ANY($1::bigint[])", ids)
        await conn.execute("DELETE FROM producers WHERE stream_id = ANY($1::bigint[])", ids)
        await conn.execute("DELETE FROM streams WHERE id = ANY($1::bigint[])", ids)
    streams = [from_record(r) for _sid, r in sorted(effects.streams.items())]
    puts = sorted((ns, key, value) for (ns, key), value in effects.kv.items() if value is not None)
    drops = sorted((ns, key) for (ns, key), value in effects.kv.items() if value is None)
    if effects.producers:
        await conn.executemany(
            "INSERT INTO producers (stream_id, producer_id, epoch, seq, length) "
            "VALUES ($1,$2,$3,$4,$5) ON CONFLICT (stream_id, producer_id) DO UPDATE SET "
            "epoch=excluded.epoch, seq=excluded.seq, length=excluded.length",
            [
                (p.stream_id, p.producer_id, p.epoch, p.seq, p.length)
                for _key, p in sorted(effects.producers.items())
            ],
        )
    if not effects.removed and not effects.cut:  # the common case: one statement
        await _write(conn, streams, effects.messages, puts, drops)
        return
    # messages removed or cut away may be ones this group appended: after the appends
    await _write(conn, streams, effects.messages, [], [])
    if effects.removed:
        await conn.execute(
            "DELETE FROM messages USING unnest($1::bigint[], $2::bigint[]) AS d(sid, pos) "
            "WHERE messages.stream_id = d.sid AND messages.position = d.pos",
            [r[0] for r in effects.removed],
            [r[1] for r in effects.removed],
        )
    for sid, low, high in effects.cut:
        await conn.execute(
            "DELETE FROM messages WHERE stream_id=$1 AND position>$2 AND position<=$3",
            sid,
            low,
            high,
        )
    await _write(conn, [], [], puts, drops)


async def _write(
    conn: Any,
    streams: Sequence[Sequence[Any]],
    messages: Sequence[tuple[int, int, bytes]],
    puts: Sequence[tuple[str, str, bytes]],
    drops: Sequence[tuple[str, str]],
) -> None:
    """Stream rows, new messages and side-table changes, in one statement (none if empty)."""
    parts = (bool(streams), bool(messages), bool(puts), bool(drops))
    if not any(parts):
        return
    args: list[Any] = []
    if streams:
        args.extend(columns(streams))
    if messages:
        args.extend([[m[0] for m in messages], [m[1] for m in messages], [m[2] for m in messages]])
    if puts:
        args.extend([[p[0] for p in puts], [p[1] for p in puts], [p[2] for p in puts]])
    if drops:
        args.extend([[d[0] for d in drops], [d[1] for d in drops]])
    await conn.execute(write_statement(parts), *args)
