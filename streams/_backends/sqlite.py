"""``sqlite:///path/to.db``: the embedded default (WAL, group commit).

Writes go through one writer connection owned by a background task. Concurrent ``commit`` calls
queue up; the task takes everything queued, validates each call in Python (the shared
:mod:`._engine` rules) and persists the effects of all calls that passed with a handful of
``executemany`` statements and a single ``COMMIT``. A call that fails validation contributes
nothing. Throughput therefore grows with concurrency instead of being capped by one round trip per
message.

Records are cached between transactions (bounded LRU). ``PRAGMA data_version`` tells the writer
whether another connection (another process) committed in between, in which case the cache is
dropped, so several processes may share one file safely. The writer connection is a stdlib
``sqlite3`` connection on its own thread, and a group normally costs one hop to that thread:
validation runs against the cache, then one call does ``BEGIN IMMEDIATE``, checks that
``data_version`` did not move, writes and commits. If it moved, the group is validated again
inside the ``BEGIN IMMEDIATE`` transaction (the slow path). Reads use separate connections (WAL lets
them run beside the writer). Waiters in this process are woken by the writer after each commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiosqlite

from .._errors import BackendUnavailable, StreamsError
from .._offsets import parse_offset
from ._engine import (
    Effects,
    Loader,
    ProducerRecord,
    ReadBuilder,
    StreamRecord,
    apply_each,
    committed,
    read_plan,
    read_start,
    readable,
)
from ._group import CommitQueue, Pending, succeeded
from ._sqlite_io import (
    COLUMNS,
    INLINE_READ_LIMIT,
    SCHEMA,
    InlineReader,
    WriterConnection,
    begin,
    commit_if_unchanged,
    kv_scan_sql,
    persist_and_commit,
    rollback,
    storage_full,
    to_record,
)
from .base import KvCheck, KvPut, Notify, Op, OpResult, ReadResult, Store, StreamInfo, Touch

__all__ = ["SqliteStore"]

logger = logging.getLogger("streams.sqlite")

_CACHE_LIMIT = 4096
_KV_CACHE_VALUE_LIMIT = 4096
# Groups up to this size are written on the event loop's thread when commits do not fsync
# (WAL with synchronous=NORMAL or OFF): a few hundred microseconds, cheaper than the two thread
# wake-ups a hop costs. Larger groups, and every wait for a lock, go to the writer thread.
_INLINE_MAX_MESSAGES = 512
_INLINE_MAX_BYTES = 512 * 1024
# How often an open store looks for commits by other processes (``PRAGMA data_version``), so
# their appends wake this process's waiters (SQLite has no cross-process notification).
_WATCH_SECONDS = 0.05
_T = TypeVar("_T")


class _PairedCommits:
    """How many commits the paired stores of this process (see :meth:`SqliteStore._pair`)
    made to each database file."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()  # paired stores run on several threads

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def add(self, key: str) -> int:
        """Count one commit to ``key``'s file; the new count."""
        with self._lock:
            count = self._counts[key] = self._counts.get(key, 0) + 1
        return count


_PAIRED = _PairedCommits()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _uncancellable(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run reader queries to completion even when the caller is cancelled.

    A query abandoned mid-way leaves its statement open, which pins the shared reader
    connection to an old snapshot: later reads on it would miss newer commits.
    """
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_retrieve)
        raise


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:///relative`` or ``sqlite:////absolute`` URL names.

    Raises:
        BackendUnavailable: the URL has no path.
    """
    parts = urlsplit(url)
    raw = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.netloc:
        raw = parts.netloc + "/" + raw
    if not raw or raw == ":memory:":
        raise BackendUnavailable(f"sqlite URL needs a file path, got {url!r}")
    return Path(raw)


class _Cache:
    """A bounded LRU of stream records (by path, with an id index) and producer records."""

    def __init__(self) -> None:
        self.streams: OrderedDict[str, StreamRecord] = OrderedDict()
        self.ids: dict[int, str] = {}
        self.producers: OrderedDict[tuple[int, str], ProducerRecord] = OrderedDict()
        self.absent: set[str] = set()
        # side-table values (None: known absent); compare-and-set checks read these
        self.kv: OrderedDict[tuple[str, str], bytes | None] = OrderedDict()

    def clear(self) -> None:
        self.streams.clear()
        self.ids.clear()
        self.producers.clear()
        self.absent.clear()
        self.kv.clear()

    def put_kv(self, key: tuple[str, str], value: bytes | None) -> None:
        if value is not None and len(value) > _KV_CACHE_VALUE_LIMIT:
            self.kv.pop(key, None)
            return
        # exact-size copy: values built by orjson keep a 4 KiB buffer
        self.kv[key] = None if value is None else bytes(bytearray(value))
        self.kv.move_to_end(key)
        while len(self.kv) > _CACHE_LIMIT:
            self.kv.popitem(last=False)

    def put(self, record: StreamRecord) -> None:
        self.absent.discard(record.path)
        self.streams[record.path] = record
        self.streams.move_to_end(record.path)
        self.ids[record.id] = record.path
        while len(self.streams) > _CACHE_LIMIT:
            _path, old = self.streams.popitem(last=False)
            self.ids.pop(old.id, None)

    def drop_id(self, stream_id: int) -> None:
        path = self.ids.pop(stream_id, None)
        if path is not None:
            self.streams.pop(path, None)
        for key in [k for k in self.producers if k[0] == stream_id]:
            del self.producers[key]

    def put_producer(self, record: ProducerRecord) -> None:
        key = (record.stream_id, record.producer_id)
        self.producers[key] = record
        self.producers.move_to_end(key)
        while len(self.producers) > _CACHE_LIMIT:
            self.producers.popitem(last=False)


class _GroupLoader(Loader):
    """Records as one group sees them: earlier batches' effects, cache, then the database."""

    def __init__(
        self,
        conn: WriterConnection,
        cache: _Cache,
        next_id: int,
        inline: sqlite3.Connection | None = None,
    ) -> None:
        self.conn = conn
        self.cache = cache
        self.effects = Effects()
        self.next_id = next_id
        self.kv_read: dict[tuple[str, str], bytes | None] = {}  # see prefetch_kv
        # Cache misses are read on the event loop's thread through ``inline`` (a WAL reader)
        # instead of a hop to the writer thread. That sees what the writer would: nothing is
        # written before validation ends, and if another process commits meanwhile the commit's
        # ``data_version`` check fails and the group is validated again under the write lock
        # (where nobody else can commit, so the reader and the writer agree).
        self.inline = inline

    async def _fetchone(self, sql: str, params: Sequence[object]) -> Any:
        if self.inline is not None:
            return self.inline.execute(sql, params).fetchone()
        return await self.conn.fetchone(sql, params)

    async def _fetchall(self, sql: str, params: Sequence[object]) -> list[Any]:
        if self.inline is not None:
            return self.inline.execute(sql, params).fetchall()
        return await self.conn.fetchall(sql, params)

    async def stream(self, path: str) -> StreamRecord | None:
        for record in self.effects.streams.values():
            if record.path == path:
                return record
        cached = self.cache.streams.get(path)
        if cached is not None:
            return None if cached.id in self.effects.purged else cached
        if path in self.cache.absent:
            return None
        row = await self._fetchone(f"SELECT {COLUMNS} FROM streams WHERE path=?", (path,))
        if row is None:
            self.cache.absent.add(path)
            return None
        record = to_record(row)
        self.cache.put(record)
        return None if record.id in self.effects.purged else record

    async def stream_by_id(self, stream_id: int) -> StreamRecord | None:
        if stream_id in self.effects.purged:
            return None
        if stream_id in self.effects.streams:
            return self.effects.streams[stream_id]
        path = self.cache.ids.get(stream_id)
        if path is not None and path in self.cache.streams:
            return self.cache.streams[path]
        row = await self._fetchone(f"SELECT {COLUMNS} FROM streams WHERE id=?", (stream_id,))
        if row is None:
            return None
        record = to_record(row)
        self.cache.put(record)
        return record

    async def producer(self, stream_id: int, producer_id: str) -> ProducerRecord | None:
        key = (stream_id, producer_id)
        if key in self.effects.producers:
            return self.effects.producers[key]
        cached = self.cache.producers.get(key)
        if cached is not None:
            return cached
        row = await self._fetchone(
            "SELECT epoch, seq, length FROM producers WHERE stream_id=? AND producer_id=?", key
        )
        if row is None:
            return None
        record = ProducerRecord(stream_id, producer_id, int(row[0]), int(row[1]), int(row[2]))
        self.cache.put_producer(record)
        return record

    def new_stream_id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def kv(self, namespace: str, key: str) -> bytes | None:
        if (namespace, key) in self.effects.kv:
            return self.effects.kv[(namespace, key)]
        if (namespace, key) in self.cache.kv:
            return self.cache.kv[(namespace, key)]
        if (namespace, key) in self.kv_read:
            return self.kv_read[(namespace, key)]
        row = await self._fetchone(
            "SELECT value FROM kv WHERE namespace=? AND key=?", (namespace, key)
        )
        value = None if row is None else bytes(row[0])
        self.cache.put_kv((namespace, key), value)
        return value

    async def prefetch(self, paths: Iterable[str]) -> None:
        missing = [
            p for p in set(paths) if p not in self.cache.streams and p not in self.cache.absent
        ]
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {COLUMNS} FROM streams WHERE path IN ({marks})"
            rows = await self._fetchall(sql, chunk)
            found = set()
            for row in rows:
                record = to_record(row)
                found.add(record.path)
                self.cache.put(record)
            self.cache.absent.update(p for p in chunk if p not in found)

    async def prefetch_kv(self, keys: Iterable[tuple[str, str]]) -> None:
        """Read the side-table rows a group checks and that the cache misses, 500 per query,
        instead of one hop to the writer thread per row (a burst of timers checks thousands)."""
        missing: dict[str, list[str]] = {}
        for namespace, key in set(keys):
            if (namespace, key) not in self.cache.kv:
                missing.setdefault(namespace, []).append(key)
        for namespace, names in missing.items():
            for start in range(0, len(names), 500):
                chunk = names[start : start + 500]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT key, value FROM kv WHERE namespace=? AND key IN ({marks})"
                rows = await self._fetchall(sql, [namespace, *chunk])
                found = {str(k): bytes(v) for k, v in rows}
                for key in chunk:
                    self.kv_read[(namespace, key)] = found.get(key)


class _ReadLoader:
    """Stream records for a read, from an aiosqlite reader connection."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def stream(self, path: str) -> StreamRecord | None:
        async with self.conn.execute(f"SELECT {COLUMNS} FROM streams WHERE path=?", (path,)) as c:
            row = await c.fetchone()
        return None if row is None else to_record(row)

    async def stream_by_id(self, stream_id: int) -> StreamRecord | None:
        async with self.conn.execute(
            f"SELECT {COLUMNS} FROM streams WHERE id=?", (stream_id,)
        ) as c:
            row = await c.fetchone()
        return None if row is None else to_record(row)


class SqliteStore(Store):
    """A store in one SQLite file. ``?synchronous=FULL`` in the URL trades speed for power-loss
    durability (the default, NORMAL, already survives a killed process)."""

    def __init__(self, url: str, *, readers: int = 2) -> None:
        super().__init__(url)
        self.path = sqlite_path(url)
        query = parse_qs(urlsplit(url).query)
        self._synchronous = query.get("synchronous", ["NORMAL"])[0].upper()
        if self._synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise BackendUnavailable(f"unknown synchronous mode {self._synchronous!r}")
        self._inline = self._synchronous in {"OFF", "NORMAL"}  # commits that never fsync
        self._reader_count = readers
        self._writer: WriterConnection | None = None
        self._readers: list[aiosqlite.Connection] = []
        # One logical read at a time per reader connection: interleaved statements on one
        # connection share its read snapshot, so a read could miss a commit it follows.
        self._reader_locks: list[asyncio.Lock] = []
        self._inline_reader: InlineReader | None = None
        self._next_reader = 0
        self._queue = CommitQueue()
        self._task: asyncio.Task[None] | None = None
        self._cache = _Cache()
        self._data_version: int | None = None
        self._next_id: int | None = None
        self._commits = 0  # groups this store committed (see _watch)
        self._shared = False  # another process was seen committing to the file
        self._file_key = os.path.abspath(self.path)
        self._paired = False  # see _pair
        self._paired_seen = 0  # this file's paired commits as of this store's last commit
        self._unexplained = False  # a move that may hide another process's commit (see _watch)
        self._watcher: asyncio.Task[None] | None = None

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute("PRAGMA busy_timeout = 10000")
        await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        return conn

    async def open(self) -> None:
        """Open the file (creating it and its folder), migrate, start the writer task.

        Raises:
            StorageFull: the disk is full (nothing is left open).
        """
        try:
            await self._open()
        except (sqlite3.Error, OSError) as exc:
            full = storage_full(exc, self.path)
            if full is None:
                raise
            with contextlib.suppress(Exception):
                await self.aclose()
            raise full from None

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await WriterConnection.open(self.path, self._synchronous)
        # Outside WAL mode (a filesystem without shared memory) every commit syncs.
        self._inline = self._inline and self._writer.wal
        self._readers = [await self._connect() for _ in range(self._reader_count)]
        self._reader_locks = [asyncio.Lock() for _ in self._readers]
        self._inline_reader = InlineReader(self.path)
        self._task = asyncio.create_task(self._run_writer(), name=f"streams-writer:{self.path}")
        self._watcher = asyncio.create_task(self._watch(), name=f"streams-watch:{self.path}")

    async def aclose(self) -> None:
        """Finish queued commits, stop the writer and close every connection."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._task is not None:
            await self._queue.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for conn in self._readers:
            await conn.close()
        if self._writer is not None:
            await self._writer.close()
        self._readers = []
        if self._inline_reader is not None:
            self._inline_reader.close()
            self._inline_reader = None
        self._writer = None

    # -- writes ----------------------------------------------------------------------------

    async def commit(self, ops: Sequence[Op]) -> list[OpResult]:
        return await self._queue.submit(ops, self._task)

    async def _run_writer(self) -> None:
        async for group in self._queue.groups():
            try:
                await self._commit_group(group)
            except Exception as exc:  # a database failure: fail every call in the group
                full = storage_full(exc, self.path)  # rolled back whole; retried calls work
                if full is not None:  # once space returns
                    logger.error("group commit failed: %s", full.message)
                else:
                    logger.exception("group commit failed")
                self._cache.clear()
                self._data_version = None
                for pending in group:
                    if not pending.future.done():
                        pending.future.set_exception(exc if full is None else full)

    async def _commit_group(self, group: list[Pending]) -> None:
        writer = self._writer
        assert writer is not None
        version = self._data_version
        if version is not None and self._next_id is not None:
            # Fast path: validate against the cache, then write in one hop unless another
            # connection committed since our last transaction.
            loader, outcomes = await self._validate(group, writer, self._next_id)
            effects = loader.effects
            size = sum(len(data) for _sid, _position, data in effects.messages)
            done = None
            if self._inline and len(effects.messages) <= _INLINE_MAX_MESSAGES:
                if size <= _INLINE_MAX_BYTES:
                    done = writer.commit_inline(effects, version)
            if done is None:
                done = await writer.run_locking(commit_if_unchanged, effects, version)
            if done:
                self._publish(group, loader, outcomes)
                await writer.wrote(size + 256 * len(group))
                return
            self._cache.clear()
        # Slow path: hold the write lock while validating against fresh records.
        version, next_id = await writer.run_locking(begin)
        moved = self._data_version is not None and version != self._data_version
        # a store paired with this one committed since this one did: the move may be its
        paired = self._paired and _PAIRED.count(self._file_key) != self._paired_seen
        try:
            if version != self._data_version:
                self._cache.clear()
            self._data_version = version
            self._next_id = next_id
            loader, outcomes = await self._validate(group, writer, next_id)
            await writer.run(persist_and_commit, writer.conn, loader.effects)
        except BaseException:
            await writer.run(rollback, writer.conn)
            raise
        self._publish(group, loader, outcomes)
        if moved and not paired:  # another process committed since our last commit: its
            self._shared = True  # waiters here too
            self._notify_all()
        elif moved:  # a paired store's, whose names were forwarded; perhaps not alone
            self._unexplained = True  # the watch wakes everything at its next look
        await writer.wrote(sum(len(m[2]) for m in loader.effects.messages) + 256 * len(group))

    async def _validate(
        self, group: list[Pending], writer: WriterConnection, next_id: int
    ) -> tuple[_GroupLoader, list[list[OpResult] | StreamsError]]:
        """Apply every call's ops in order; failed calls contribute no effects."""
        reader = self._inline_reader
        inline = reader.conn if reader is not None and writer.wal else None
        loader = _GroupLoader(writer, self._cache, next_id, inline)
        await loader.prefetch(
            op.path for p in group for op in p.ops if not isinstance(op, KvPut | KvCheck | Notify)
        )
        await loader.prefetch_kv(
            (op.namespace, op.key)
            for p in group
            for op in p.ops
            if isinstance(op, KvCheck) or (isinstance(op, KvPut) and op.only_if)
        )
        outcomes = await apply_each(loader, (p.ops for p in group), loader.effects.merge)
        return loader, outcomes

    def _pair(self) -> None:
        """Count this store among the *paired* stores of this process on its file: stores
        whose owner hands each one the names every other's commits touched (``entities serve``
        and the worker thread it embeds). Their commits move ``data_version`` for each other as
        another process's would; a move they explain no longer wakes everything at once (the
        watch still does within :data:`_WATCH_SECONDS`, in case another process committed
        too). Raises nothing."""
        self._paired = True
        self._paired_seen = _PAIRED.count(self._file_key)

    def _publish(
        self,
        group: list[Pending],
        loader: _GroupLoader,
        outcomes: list[list[OpResult] | StreamsError],
    ) -> None:
        """The group's commit is durable: update the cache, answer the callers, wake waiters."""
        self._commits += 1
        if self._paired:
            self._paired_seen = _PAIRED.add(self._file_key)
        self._next_id = loader.next_id
        effects = loader.effects
        for sid in effects.purged:
            self._cache.drop_id(sid)
        for record in effects.streams.values():
            self._cache.put(record)
        for producer in effects.producers.values():
            self._cache.put_producer(producer)
        for kv_key, kv_value in effects.kv.items():
            self._cache.put_kv(kv_key, kv_value)
        for pending, outcome in zip(group, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, StreamsError):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        self._committed(committed(succeeded(group, outcomes), effects))

    async def _watch(self) -> None:
        """Wake this process's waiters when another process commits to the file.

        Every ``_WATCH_SECONDS`` the inline reader's connection reads ``PRAGMA data_version``,
        which moves with every commit by another connection (this store's writer included). Once a
        move is seen with no commit of this store (nor of a store paired with it, see
        :meth:`_pair`) in between, another process writes here: from then on every move wakes
        all waiters and listeners (they re-check what they wait for), so a server's long-polls
        and SSE readers and a worker's dispatch see another process's appends within ~50 ms. So
        does a move that a commit of this store found and a paired store's commits may not wholly
        explain. A store alone on its file never wakes anyone this way.
        """
        assert self._inline_reader is not None
        conn = self._inline_reader.conn  # used on this thread only, like the watcher
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            commits, paired = self._commits, _PAIRED.count(self._file_key)
            while True:
                await asyncio.sleep(_WATCH_SECONDS)
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                wake, self._unexplained = self._unexplained, False
                if version != last:
                    now_paired = _PAIRED.count(self._file_key) if self._paired else paired
                    if self._commits == commits and now_paired == paired:
                        self._shared = True  # it moved, and not by this store or its pair
                    last, commits, paired = version, self._commits, now_paired
                    wake = wake or self._shared
                if wake:
                    self._notify_all()
        except sqlite3.Error as exc:  # the file went away, say: fall back to timeouts
            logger.warning("watching %s for other processes' commits stopped: %s", self.path, exc)

    # -- reads -----------------------------------------------------------------------------

    async def _reading(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """Run ``fn(conn, *args)`` on a reader connection nobody else is using."""
        if not self._readers:
            raise StreamsError("store is not open", path="")
        index = next((i for i, lock in enumerate(self._reader_locks) if not lock.locked()), None)
        if index is None:
            self._next_reader = index = (self._next_reader + 1) % len(self._readers)
        async with self._reader_locks[index]:
            return await fn(self._readers[index], *args)

    async def _record(self, conn: aiosqlite.Connection, path: str) -> StreamRecord:
        record = await _ReadLoader(conn).stream(path)
        return readable(record, path)

    async def head(self, path: str) -> StreamInfo:
        if self._inline_reader is not None:
            return self._inline_reader.head(path)
        return await _uncancellable(self._reading(self._head, path))

    async def _head(self, conn: aiosqlite.Connection, path: str) -> StreamInfo:
        record = await self._record(conn, path)
        parent = None
        if record.fork_parent is not None:
            parent = await _ReadLoader(conn).stream_by_id(record.fork_parent)
        return record.info(None if parent is None else parent.path)

    async def read(
        self,
        path: str,
        offset: str = "-1",
        *,
        limit: int = 1000,
        max_bytes: int | None = None,
        renew_ttl: bool = True,
    ) -> ReadResult:
        reader = self._inline_reader
        if reader is not None and limit <= INLINE_READ_LIMIT:
            # a small read costs less than one hop to a reader thread: do it right here
            result, ttl = reader.read(path, offset, limit, max_bytes)
            if renew_ttl and ttl:
                await self.commit([Touch(path)])
            return result
        return await _uncancellable(
            self._reading(self._read, path, offset, limit, max_bytes, renew_ttl)
        )

    async def _read(
        self,
        conn: aiosqlite.Connection,
        path: str,
        offset: str,
        limit: int,
        max_bytes: int | None,
        renew_ttl: bool,
    ) -> ReadResult:
        parsed = parse_offset(offset, path=path)
        # No explicit transaction: every query below is bounded by ``record.length``, so
        # messages committed after the record was read never leak into this answer.
        record = await self._record(conn, path)
        start = read_start(record, offset, parsed)
        read = ReadBuilder(start, limit, max_bytes)
        for sid, low, high in await read_plan(record, start, _ReadLoader(conn).stream_by_id):
            if read.full:
                break
            async with conn.execute(
                "SELECT position, data FROM messages WHERE stream_id=? AND position>? "
                "AND position<=? ORDER BY position LIMIT ?",
                (sid, low, high, read.room),
            ) as cursor:
                rows = await cursor.fetchall()
            for row_position, data in rows:
                if not read.add(int(row_position), bytes(data)):
                    break
            read.reach(high)
        if renew_ttl and record.ttl_seconds is not None:
            await self.commit([Touch(path)])
        return read.result(record)

    async def schema_versions(self) -> tuple[int, int]:
        async def read(conn: aiosqlite.Connection) -> int:
            async with conn.execute("SELECT max(version) FROM schema_version") as cursor:
                row = await cursor.fetchone()
            return 0 if row is None or row[0] is None else int(row[0])

        return await _uncancellable(self._reading(read)), len(SCHEMA)

    async def kv_get(self, namespace: str, key: str) -> bytes | None:
        if self._inline_reader is not None:
            return self._inline_reader.kv_get(namespace, key)
        return await _uncancellable(self._reading(self._kv_get, namespace, key))

    async def _kv_get(self, conn: aiosqlite.Connection, namespace: str, key: str) -> bytes | None:
        async with conn.execute(
            "SELECT value FROM kv WHERE namespace=? AND key=?", (namespace, key)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else bytes(row[0])

    async def kv_scan(
        self,
        namespace: str,
        prefix: str = "",
        *,
        after: str | None = None,
        end: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, bytes]]:
        if self._inline_reader is not None:
            return self._inline_reader.kv_scan(namespace, prefix, after, end, limit)
        return await _uncancellable(
            self._reading(self._kv_scan, namespace, prefix, after, end, limit)
        )

    async def _kv_scan(
        self,
        conn: aiosqlite.Connection,
        namespace: str,
        prefix: str,
        after: str | None,
        end: str | None,
        limit: int | None,
    ) -> list[tuple[str, bytes]]:
        async with conn.execute(*kv_scan_sql(namespace, prefix, after, end, limit)) as cursor:
            rows = await cursor.fetchall()
        return [(str(k), bytes(v)) for k, v in rows]
