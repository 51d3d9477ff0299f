"""SQLite plumbing of the ``sqlite:///`` backend: the schema and its migrations, row <-> record
conversion, the writer connection (its own thread; small commits inline) and the checkpointer
beside it, persisting a group's effects, and the inline reader used on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from .._errors import StorageFull
from .._offsets import parse_offset
from ._engine import (
    Effects,
    ReadBuilder,
    StreamRecord,
    kv_range,
    needs_parent,
    plan_ranges,
    read_start,
    readable,
)
from .base import ReadResult, StreamInfo

__all__ = [
    "CHECKPOINT_BYTES",
    "COLUMNS",
    "INLINE_READ_LIMIT",
    "SCHEMA",
    "UPSERT_STREAM",
    "WAL_LIMIT_BYTES",
    "Checkpointer",
    "InlineReader",
    "WriterConnection",
    "begin",
    "commit_if_unchanged",
    "enable_wal",
    "from_record",
    "kv_scan_sql",
    "migrate",
    "persist",
    "persist_and_commit",
    "rollback",
    "storage_full",
    "to_record",
]

logger = logging.getLogger("streams.sqlite")

_T = TypeVar("_T")

SCHEMA = [
    # version 1
    """
    CREATE TABLE streams (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        content_type TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_access REAL NOT NULL,
        length INTEGER NOT NULL,
        ttl_seconds INTEGER,
        expires_at REAL,
        closed INTEGER NOT NULL,
        closed_by TEXT,
        fork_parent INTEGER,
        fork_position INTEGER NOT NULL,
        last_stream_seq TEXT,
        deleted INTEGER NOT NULL,
        fork_count INTEGER NOT NULL
    );
    CREATE TABLE messages (
        stream_id INTEGER NOT NULL,
        position INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (stream_id, position)
    ) WITHOUT ROWID;
    CREATE TABLE producers (
        stream_id INTEGER NOT NULL,
        producer_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        length INTEGER NOT NULL,
        PRIMARY KEY (stream_id, producer_id)
    ) WITHOUT ROWID;
    CREATE TABLE kv (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;
    """,
    # version 2: forks cut inside a message (Stream-Fork-Sub-Offset)
    """
    ALTER TABLE streams ADD COLUMN fork_sub_offset INTEGER NOT NULL DEFAULT 0;
    """,
    # version 3: prefix truncation (the earliest retained position)
    """
    ALTER TABLE streams ADD COLUMN retained_from INTEGER NOT NULL DEFAULT 0;
    """,
]

COLUMNS = (
    "id, path, content_type, created_at, last_access, length, ttl_seconds, expires_at, closed, "
    "closed_by, fork_parent, fork_position, last_stream_seq, deleted, fork_count, fork_sub_offset, "
    "retained_from"
)
UPSERT_STREAM = (
    f"INSERT INTO streams ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(id) DO UPDATE SET last_access=excluded.last_access, length=excluded.length, "
    "closed=excluded.closed, closed_by=excluded.closed_by, "
    "last_stream_seq=excluded.last_stream_seq, "
    "deleted=excluded.deleted, fork_count=excluded.fork_count, "
    "retained_from=excluded.retained_from"
)


# Auto-checkpointing is off on the writer (it would run inside an inline commit); the writer
# thread runs a passive checkpoint after about this much WAL growth instead. The WAL file is
# also cut back to this size when SQLite starts it over (``journal_size_limit``).
CHECKPOINT_BYTES = 4 * 1024 * 1024
# The hard bound. A passive checkpoint cannot start the WAL over while a reader still uses a
# snapshot in it, and the one beside the writer may lag under load (the WAL reached 61-72 MB
# under sustained sends with readers). Once the WAL file reaches this size, the writer runs a
# TRUNCATE checkpoint itself: it waits (at most _TRUNCATE_WAIT_MS) for readers to finish their
# snapshots, copies everything and empties the file; commits queue behind it meanwhile.
WAL_LIMIT_BYTES = 8 * 1024 * 1024
_TRUNCATE_WAIT_MS = 2000


def storage_full(exc: BaseException, path: Path) -> StorageFull | None:
    """The :class:`StorageFull` that ``exc`` means, if it means the disk is full: SQLite's
    ``SQLITE_FULL``, ``ENOSPC``/``EDQUOT``, or an I/O error while the disk has no room left
    (growing the shared-memory file fails that way)."""
    full = False
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        full = code == sqlite3.SQLITE_FULL
        if code == sqlite3.SQLITE_IOERR:
            with contextlib.suppress(OSError):
                full = shutil.disk_usage(path.parent).free < 64 * 1024
    elif isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full:
        return None
    return StorageFull(f"no space left on the device of {path}: {exc}")


def to_record(row: Sequence[object]) -> StreamRecord:
    closed_by = row[9]
    return StreamRecord(
        id=int(row[0]),  # type: ignore[call-overload]
        path=str(row[1]),
        content_type=str(row[2]),
        created_at=float(row[3]),  # type: ignore[arg-type]
        last_access=float(row[4]),  # type: ignore[arg-type]
        length=int(row[5]),  # type: ignore[call-overload]
        ttl_seconds=None if row[6] is None else int(row[6]),  # type: ignore[call-overload]
        expires_at=None if row[7] is None else float(row[7]),  # type: ignore[arg-type]
        closed=bool(row[8]),
        closed_by=None if closed_by is None else tuple(orjson.loads(str(closed_by))),
        fork_parent=None if row[10] is None else int(row[10]),  # type: ignore[call-overload]
        fork_position=int(row[11]),  # type: ignore[call-overload]
        last_stream_seq=None if row[12] is None else str(row[12]),
        deleted=bool(row[13]),
        fork_count=int(row[14]),  # type: ignore[call-overload]
        fork_sub_offset=int(row[15]),  # type: ignore[call-overload]
        retained_from=int(row[16]),  # type: ignore[call-overload]
    )


def from_record(r: StreamRecord) -> tuple[object, ...]:
    closed_by = None if r.closed_by is None else orjson.dumps(list(r.closed_by)).decode()
    return (r.id, r.path, r.content_type, r.created_at, r.last_access, r.length, r.ttl_seconds,
            r.expires_at, int(r.closed), closed_by, r.fork_parent, r.fork_position,
            r.last_stream_seq, int(r.deleted), r.fork_count, r.fork_sub_offset,
            r.retained_from)  # fmt: skip


def enable_wal(conn: sqlite3.Connection, timeout: float = 10.0) -> None:
    """Switch the file to WAL. The switch needs the database to itself and SQLite does not wait
    for it (no busy handler), so when another process is opening or migrating the same new file
    at that moment, retry until ``timeout``.

    Raises:
        sqlite3.OperationalError: still locked after ``timeout`` seconds, or any other error.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class WriterConnection:
    """The writer: a stdlib ``sqlite3`` connection used only from its own thread.

    Every :meth:`run` is one hop to that thread, so a whole group commit can be a single call
    instead of one thread round trip per statement.
    """

    def __init__(
        self, conn: sqlite3.Connection, executor: ThreadPoolExecutor, checkpointer: Checkpointer
    ) -> None:
        self.conn = conn
        self.executor = executor
        self.checkpointer = checkpointer
        self.waits_for_locks = True
        self.wal_bytes = 0
        self.wal_path = f"{checkpointer.path}-wal"
        self.truncate_at = WAL_LIMIT_BYTES
        self.truncations = 0
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        self.wal = mode is not None and str(mode[0]).lower() == "wal"

    @classmethod
    async def open(cls, path: Path, synchronous: str) -> WriterConnection:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streams-writer")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA busy_timeout = 10000")
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                enable_wal(conn)
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute(f"PRAGMA journal_size_limit = {CHECKPOINT_BYTES}")
                migrate(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor, Checkpointer(path, synchronous))

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _lock_waits(self, wait: bool) -> None:
        if wait != self.waits_for_locks:
            self.conn.execute(f"PRAGMA busy_timeout = {10000 if wait else 0}")
            self.waits_for_locks = wait

    async def run_locking(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(conn, *args)`` on the writer thread, waiting for other processes' write locks."""

        def call() -> _T:
            self._lock_waits(True)
            return fn(self.conn, *args)

        return await self.run(call)

    def commit_inline(self, effects: Effects, version: int) -> bool | None:
        """:func:`commit_if_unchanged` on the calling thread; ``None`` (nothing done) when
        another connection holds the write lock, since waiting here would block the loop."""
        self._lock_waits(False)
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return None
            raise
        return commit_if_unchanged(self.conn, effects, version, begun=True)

    async def wrote(self, size: int) -> None:
        """After a commit of about ``size`` bytes: checkpoint now and then.

        The bulk of a checkpoint runs beside the writer (see :class:`Checkpointer`); it starts
        once the WAL file has grown past :data:`CHECKPOINT_BYTES` (SQLite cuts the file back to
        that size when it starts the WAL over, so growth past it is WAL written since then; the
        bytes of the messages committed undercount it many times over, since every commit
        writes whole pages). Once it is done, the few frames committed meanwhile are copied
        here, between commits, so the WAL is wholly copied and the next commit starts it over
        instead of growing it. If the WAL file still reaches :data:`WAL_LIMIT_BYTES` (readers
        kept it from starting over, or the checkpoint beside the writer lags), the writer
        truncates it (see :meth:`truncate_wal`).
        """
        self.wal_bytes += size
        if not self.wal:
            return
        try:
            wal_size = os.stat(self.wal_path).st_size
        except OSError:
            wal_size = 0
        if wal_size >= self.truncate_at:
            self.wal_bytes = 0
            # SQLite runs one checkpoint at a time: let the one beside the writer finish first
            await self.checkpointer.wait(_TRUNCATE_WAIT_MS / 1000)
            await self.run(self.truncate_wal, wal_size)
        elif self.checkpointer.take_finished():
            await self.run(lambda: self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
        elif wal_size > CHECKPOINT_BYTES or self.wal_bytes >= CHECKPOINT_BYTES:
            self.wal_bytes = 0
            self.checkpointer.start()

    def truncate_wal(self, wal_size: int) -> None:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` on the writer's thread, waiting a bounded time
        for readers. A failure (a reader in another process held its snapshot throughout, or
        the disk is full) is logged, and the next try waits for :data:`CHECKPOINT_BYTES` more
        growth, so a stuck reader elsewhere does not stall every commit."""
        conn = self.conn
        deadline = time.monotonic() + _TRUNCATE_WAIT_MS / 1000
        done: bool | None = False
        try:
            conn.execute(f"PRAGMA busy_timeout = {_TRUNCATE_WAIT_MS}")
            # SQLITE_BUSY comes back at once, without the busy handler, while another
            # connection checkpoints: retry until the deadline
            while not done and time.monotonic() < deadline:
                row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                done = row is not None and int(row[0]) == 0
                if not done:
                    time.sleep(0.005)
        except sqlite3.Error as exc:
            logger.warning("truncating the WAL (%d bytes) failed: %s", wal_size, exc)
            done = None
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA busy_timeout = 10000")
            self.waits_for_locks = True
        if done:
            self.truncations += 1
            self.truncate_at = WAL_LIMIT_BYTES
        else:
            if done is False:
                logger.warning("the WAL (%d bytes) stays: readers kept their snapshots", wal_size)
            self.truncate_at = wal_size + CHECKPOINT_BYTES

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Any:
        return await self.run(lambda: self.conn.execute(sql, params).fetchone())

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        return await self.run(lambda: self.conn.execute(sql, params).fetchall())

    async def close(self) -> None:
        await self.checkpointer.close()
        await self.run(self.conn.close)
        self.executor.shutdown(wait=True)


class Checkpointer:
    """Passive WAL checkpoints on a connection and thread of their own.

    Copying the WAL back into the database (and the fsyncs around it) takes milliseconds to tens
    of milliseconds; on the writer's thread it held up every commit queued behind it. A passive
    checkpoint runs beside writers (they keep appending to the WAL), so here it delays nothing.
    At most one runs at a time; a failure is logged and the next one retries.
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streams-checkpoint")
        self.conn: sqlite3.Connection | None = None
        self.running: asyncio.Future[None] | None = None
        self.runs = 0

    def start(self) -> None:
        if self.running is not None:
            return  # one is still copying (or its catch-up is due): growth is counted anew
        self.running = asyncio.get_running_loop().run_in_executor(self.executor, self._run)
        self.running.add_done_callback(self._done)

    async def wait(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the running checkpoint, if any, to finish (its
        failure is logged)."""
        if self.running is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.running), seconds)
            if self.running.done():
                self.running = None

    def take_finished(self) -> bool:
        """Whether a checkpoint finished since the last call."""
        finished = self.running is not None and self.running.done()
        if finished:
            self.running = None
        return finished

    def _run(self) -> None:
        if self.conn is None:
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self.runs += 1

    @staticmethod
    def _done(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.warning("WAL checkpoint failed: %s", future.exception())

    async def close(self) -> None:
        if self.running is not None:
            with contextlib.suppress(Exception):
                await self.running
        conn, self.conn = self.conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, conn.close)
        self.executor.shutdown(wait=True)


def migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        version = 0 if row is None or row[0] is None else int(row[0])
        for number, script in enumerate(SCHEMA[version:], start=version + 1):
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def begin(conn: sqlite3.Connection) -> tuple[int, int]:
    """``BEGIN IMMEDIATE``; return ``(data_version, max stream id)`` as the lock holder sees."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        next_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM streams").fetchone()[0])
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version, next_id


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def persist_and_commit(conn: sqlite3.Connection, effects: Effects) -> None:
    """Write ``effects`` and ``COMMIT`` the open transaction (rolled back on any failure)."""
    try:
        persist(conn, effects)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def commit_if_unchanged(
    conn: sqlite3.Connection, effects: Effects, version: int, *, begun: bool = False
) -> bool:
    """The fast path in one call: write ``effects`` unless another connection wrote since
    ``version`` was read (then roll back and return False)."""
    if not begun:
        conn.execute("BEGIN IMMEDIATE")
    try:
        if int(conn.execute("PRAGMA data_version").fetchone()[0]) != version:
            conn.execute("ROLLBACK")
            return False
    except BaseException:
        rollback(conn)
        raise
    persist_and_commit(conn, effects)
    return True


def persist(conn: sqlite3.Connection, effects: Effects) -> None:
    if effects.purged:
        ids = [(sid,) for sid in effects.purged]
        conn.executemany("DELETE FROM messages WHERE stream_id=?", ids)
        conn.executemany("DELETE FROM producers WHERE stream_id=?", ids)
        conn.executemany("DELETE FROM streams WHERE id=?", ids)
    if effects.streams:
        conn.executemany(UPSERT_STREAM, [from_record(r) for r in effects.streams.values()])
    if effects.messages:
        conn.executemany(
            "INSERT INTO messages (stream_id, position, data) VALUES (?,?,?)", effects.messages
        )
    if effects.removed:
        conn.executemany("DELETE FROM messages WHERE stream_id=? AND position=?", effects.removed)
    if effects.cut:
        conn.executemany(
            "DELETE FROM messages WHERE stream_id=? AND position>? AND position<=?", effects.cut
        )
    if effects.producers:
        conn.executemany(
            "INSERT INTO producers (stream_id, producer_id, epoch, seq, length) "
            "VALUES (?,?,?,?,?) ON CONFLICT(stream_id, producer_id) DO UPDATE SET "
            "epoch=excluded.epoch, seq=excluded.seq, length=excluded.length",
            [
                (p.stream_id, p.producer_id, p.epoch, p.seq, p.length)
                for p in effects.producers.values()
            ],
        )
    puts = [(ns, key, value) for (ns, key), value in effects.kv.items() if value is not None]
    drops = [(ns, key) for (ns, key), value in effects.kv.items() if value is None]
    if puts:
        conn.executemany(
            "INSERT INTO kv (namespace, key, value) VALUES (?,?,?) "
            "ON CONFLICT(namespace, key) DO UPDATE SET value=excluded.value",
            puts,
        )
    if drops:
        conn.executemany("DELETE FROM kv WHERE namespace=? AND key=?", drops)


INLINE_READ_LIMIT = 1000


def kv_scan_sql(
    namespace: str, prefix: str, after: str | None, end: str | None, limit: int | None
) -> tuple[str, tuple[object, ...]]:
    """The query of a side-table scan (see :meth:`Store.kv_scan`) and its arguments."""
    lower, inclusive, upper = kv_range(prefix, after, end)
    sql = (
        f"SELECT key, value FROM kv WHERE namespace=? AND key {'>=' if inclusive else '>'} ? "
        "AND key < ? ORDER BY key LIMIT ?"
    )
    return sql, (namespace, lower, upper, -1 if limit is None else limit)


class InlineReader:
    """A stdlib ``sqlite3`` connection used on the event loop's own thread for small reads.

    Reading a few rows from SQLite's page cache takes microseconds, less than one hop to a
    reader thread and back, so small reads (a wake's tail, a side-table row) run inline.
    Large reads still go to the aiosqlite reader threads. WAL lets it read beside the writer.
    """

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 1000")

    def close(self) -> None:
        self.conn.close()

    def _row(self, sql: str, args: Sequence[object]) -> Any:
        return self.conn.execute(sql, args).fetchone()

    def stream(self, path: str) -> StreamRecord | None:
        row = self._row(f"SELECT {COLUMNS} FROM streams WHERE path=?", (path,))
        return None if row is None else to_record(row)

    def stream_by_id(self, stream_id: int) -> StreamRecord | None:
        row = self._row(f"SELECT {COLUMNS} FROM streams WHERE id=?", (stream_id,))
        return None if row is None else to_record(row)

    def live(self, path: str) -> StreamRecord:
        record = self.stream(path)
        return readable(record, path)

    def head(self, path: str) -> StreamInfo:
        record = self.live(path)
        parent = None
        if record.fork_parent is not None:
            parent = self.stream_by_id(record.fork_parent)
        return record.info(None if parent is None else parent.path)

    def plan(self, record: StreamRecord, start: int) -> list[tuple[int, int, int]]:
        """Like :func:`read_plan`, synchronously."""
        chain = [record]
        while (parent_id := needs_parent(chain, start)) is not None:
            parent = self.stream_by_id(parent_id)
            if parent is None:
                break
            chain.append(parent)
        return plan_ranges(chain, start)

    def read(
        self, path: str, offset: str, limit: int, max_bytes: int | None
    ) -> tuple[ReadResult, bool]:
        """The read, and whether the stream has a TTL to renew."""
        parsed = parse_offset(offset, path=path)
        record = self.live(path)
        start = read_start(record, offset, parsed)
        read = ReadBuilder(start, limit, max_bytes)
        for sid, low, high in self.plan(record, start):
            if read.full:
                break
            rows = self.conn.execute(
                "SELECT position, data FROM messages WHERE stream_id=? AND position>? "
                "AND position<=? ORDER BY position LIMIT ?",
                (sid, low, high, read.room),
            ).fetchall()
            for row_position, data in rows:
                if not read.add(int(row_position), bytes(data)):
                    break
            read.reach(high)
        return read.result(record), record.ttl_seconds is not None

    def kv_get(self, namespace: str, key: str) -> bytes | None:
        row = self._row("SELECT value FROM kv WHERE namespace=? AND key=?", (namespace, key))
        return None if row is None else bytes(row[0])

    def kv_scan(
        self, namespace: str, prefix: str, after: str | None, end: str | None, limit: int | None
    ) -> list[tuple[str, bytes]]:
        sql, args = kv_scan_sql(namespace, prefix, after, end, limit)
        rows = self.conn.execute(sql, args).fetchall()
        return [(str(k), bytes(v)) for k, v in rows]
