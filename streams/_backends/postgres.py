"""``postgresql://user@host:port/db[?schema=NAME]``: the scale-out backend (asyncpg).

Any number of processes, on any number of machines, may open stores on one database schema.

Writes: concurrent ``commit`` calls of one store queue up; a writer task takes everything queued
and runs it as ONE transaction on its own connection (group commit). Inside it, before reading
anything, the transaction takes advisory locks on every stream path and side-table key the group
touches (sorted, so two groups never wait on each other in a cycle) and reads the stream rows
``FOR UPDATE``; rows reached by id (fork parents) are read ``FOR UPDATE`` too. Every writer in
every process does the same, so validation (the shared :mod:`._engine` rules) always sees the
latest committed records and two processes can never both append at one position or both win a
compare-and-set. A call that fails validation contributes nothing; a deadlock, serialization or
unique-key failure rolls the group back and runs it again.

A transaction is three round trips: the locks and the reads (the schema's ``lock_and_read``
function: its query runs after the locks are granted, so it sees every commit made before them),
every write in one statement, and the notifications with ``COMMIT`` and the ``BEGIN`` of the
writer's next transaction. So the writer's connection waits "idle in transaction" between groups;
that transaction has taken no snapshot and no transaction id, so it holds nothing back (vacuum,
other writers), and the session turns ``idle_in_transaction_session_timeout`` off for itself.

Wake-ups: the transaction ends with ``pg_notify`` on the schema's channel carrying the touched
paths and ``kv:{namespace}`` names (split across notifications under PostgreSQL's 8000-byte payload
limit; a name that does not fit becomes ``*``, "wake everything"). Every store keeps one LISTEN
connection, re-established after a drop (then it wakes everything, since notifications may have
been missed), and feeds what it hears to the in-process notifier: ``wait()``, ``wait_signal()`` and
``listen()`` fire for commits made by other processes. A notification is a hint: ``wait()``
re-checks the stream before returning.

Reads use a connection pool. A read is bounded by the stream length it read first, so messages
committed meanwhile never leak into its answer. Concurrent reads of one kind (``kv_get``,
``kv_scan``, ``read``) are coalesced into one query (see :mod:`._postgres_batch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import asyncpg
import orjson

from .._errors import InvalidRequest, StorageFull, StreamsError
from .._offsets import parse_offset
from ._engine import (
    ReadBuilder,
    StreamRecord,
    apply_each,
    committed,
    kv_range,
    read_plan,
    read_start,
    readable,
)
from ._group import CommitQueue, Pending, succeeded
from ._postgres_batch import ReadBatcher
from ._postgres_schema import MIGRATIONS, PostgresUrl, advisory_key, migrate, parse_url, quote_ident
from ._postgres_speculate import SPECULATE_SQL, KnownRows, SpeculativeLoader, known_rows, speculate
from ._postgres_sql import (
    COLUMNS,
    GroupLoader,
    ReadLoader,
    columns,
    fetch,
    persist,
    to_record,
)
from .base import (
    Append,
    Create,
    KvCheck,
    KvPut,
    Notify,
    Op,
    OpResult,
    ReadResult,
    Store,
    StreamInfo,
    Touch,
)

__all__ = ["PostgresStore"]

logger = logging.getLogger("streams.postgres")

_T = TypeVar("_T")
_MAX_ATTEMPTS = 20
_PAYLOAD_LIMIT = 7900  # PostgreSQL rejects NOTIFY payloads of 8000 bytes or more
# a busy writer waits this long for more commits to join its next group (see _group): a
# transaction costs three round trips whatever it holds (at 32 concurrent request-responses,
# 1 ms cut the transactions per message by a tenth and the server's CPU per message by 7%)
_LINGER = 0.001
# a writer idle longer than this (seconds) opens a transaction before a speculated call: a
# connection that died meanwhile then fails there, before anything could commit, and the group
# runs again on a new one (a lone call that fails leaves its outcome unknown)
_FRESH_SECONDS = 1.0
_RETRYABLE = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,
)
_DISCONNECTED = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a protocol left mid-operation by a dropped link
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    ConnectionError,
    OSError,
)


def notification_payloads(names: Iterable[str]) -> list[str]:
    """JSON arrays of ``names``, each under the NOTIFY payload limit (``*`` for an outsize one)."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = 2
    for name in sorted(names):
        encoded = len(orjson.dumps(name)) + 1
        if encoded + 2 > _PAYLOAD_LIMIT:
            name, encoded = "*", 4
        if chunk and size + encoded > _PAYLOAD_LIMIT:
            payloads.append(orjson.dumps(chunk).decode())
            chunk, size = [], 2
        chunk.append(name)
        size += encoded
    if chunk:
        payloads.append(orjson.dumps(chunk).decode())
    return payloads


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (``E'...'``: quotes and backslashes escaped, so it
    reads the same whatever ``standard_conforming_strings`` says; JSON holds no NUL)."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _commit(channel: str, payloads: Sequence[str]) -> str:
    """The ``pg_notify`` of each payload on ``channel``, ``COMMIT``, and the ``BEGIN`` of the
    writer's next transaction: one simple query (a failed ``NOTIFY`` skips the rest)."""
    notes = [f"SELECT pg_notify({_literal(channel)}, {_literal(p)})" for p in payloads]
    return "; ".join([*notes, "COMMIT", "BEGIN"])


class _NotCommitted(Exception):
    """The writer connection failed before ``COMMIT`` was sent: safe to run the group again."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


async def _keep_session(_conn: Any) -> None:
    """The pool's reset on release: nothing. Reads change no session state (no temporary
    tables, settings, LISTEN or advisory locks), so asyncpg's default reset query (``RESET ALL;
    UNLISTEN *; ...``, a round trip after every read) is pure overhead."""


_NEVER = 2**62  # a position no stream reaches: "read nothing" (offset "now")
# Stream reads in one statement, one row per (path $1[i], after $2[i], limit $3[i]) by ordinal i:
# the stream's record and, when the stream is no fork, up to that limit of its messages after that
# position (a fork's earlier positions live in its ancestors: read_plan). A missing stream has no
# row.
_READ_MANY = (
    f"SELECT w.i, {', '.join('s.' + c for c in COLUMNS.split(', '))}, "
    "m.positions AS m_positions, m.data AS m_data "
    "FROM unnest($1::text[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS w(path, after, lim, i) "
    "JOIN streams s ON s.path = w.path LEFT JOIN LATERAL ("
    "SELECT array_agg(x.position ORDER BY x.position) AS positions, "
    "array_agg(x.data ORDER BY x.position) AS data FROM ("
    "SELECT position, data FROM messages WHERE s.fork_parent IS NULL AND stream_id = s.id "
    "AND position > w.after AND position <= s.length ORDER BY position LIMIT w.lim) x) m ON true"
)
_KV_GET_MANY = (
    "SELECT w.i, kv.value FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(ns, key, i) "
    'JOIN kv ON kv.namespace = w.ns COLLATE "C" AND kv.key = w.key COLLATE "C"'
)
_KV_SCAN_MANY = (
    "SELECT w.i, k.key, k.value FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], "
    "$5::bigint[]) WITH ORDINALITY AS w(ns, lower, inclusive, upper, lim, i) "
    "CROSS JOIN LATERAL (SELECT kv.key, kv.value FROM kv "
    'WHERE kv.namespace = w.ns COLLATE "C" AND kv.key >= w.lower COLLATE "C" '
    'AND (w.inclusive OR kv.key > w.lower COLLATE "C") AND kv.key < w.upper COLLATE "C" '
    "ORDER BY kv.key LIMIT w.lim) k ORDER BY w.i, k.key"
)
_KvScan = tuple[str, str, bool, str, int | None]


class PostgresStore(Store):
    """A store in one PostgreSQL schema, shared safely by any number of processes."""

    def __init__(self, url: str, *, readers: int = 4, connect_seconds: float = 15.0) -> None:
        super().__init__(url)
        self._connect_seconds = connect_seconds
        self._parsed: PostgresUrl = parse_url(url)
        self._reader_count = max(1, readers)
        self._writer: Any = None
        self._pool: Any = None
        self._queue = CommitQueue(linger=_LINGER)
        self._task: asyncio.Task[None] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._writer_pid: int | None = None
        # copies of rows, shared with this process's other stores on the schema (speculation)
        self._known: KnownRows = known_rows(self._parsed.dsn, self._parsed.schema)
        self._partner: PostgresStore | None = None  # see _pair_with
        self.speculations: dict[str, int] = {"hit": 0, "miss": 0}  # verified, stale copies
        self._begun = False  # the writer connection is in a transaction no statement ran in
        self._used_at = 0.0  # when the writer's last group ended (time.monotonic)
        self._kv_gets = ReadBatcher(self._kv_get_many, parallel=2)
        self._kv_scans = ReadBatcher(self._kv_scan_many, parallel=2)
        self._reads = ReadBatcher(self._read_many, parallel=2)

    @property
    def schema(self) -> str:
        """The database schema this store lives in (``public`` unless the URL names one)."""
        return self._parsed.schema

    async def _connect(self, role: str = "streams-writer") -> Any:
        settings = {"search_path": self._parsed.search_path, "application_name": role}
        if role == "streams-writer":  # it waits in its next transaction (see the docstring)
            settings["idle_in_transaction_session_timeout"] = "0"
        return await asyncpg.connect(self._parsed.dsn, server_settings=settings)

    async def _connect_retrying(self, role: str, deadline: float) -> Any:
        """:meth:`_connect`, retried with backoff until ``deadline`` while the server is
        unreachable, starting up or shutting down."""
        delay = 0.05
        while True:
            try:
                return await self._connect(role)
            except _DISCONNECTED as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("PostgreSQL unreachable (%s); retrying in %.2fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def open(self) -> None:
        """Connect, create the schema or migrate it, start the writer and the listener.

        While the server is unreachable (or starting up) this retries for up to
        ``connect_seconds`` before giving up.
        """
        deadline = time.monotonic() + self._connect_seconds
        delay = 0.05
        while True:
            try:
                await self._open_once(deadline)
                break
            except _DISCONNECTED as exc:
                await self._close_connections()
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("opening the store failed (%s); retrying in %.2fs", exc, delay)
            except BaseException:
                await self._close_connections()
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        self._task = asyncio.create_task(
            self._run_writer(), name=f"streams-writer:{self._parsed.schema}"
        )

    async def _open_once(self, deadline: float) -> None:
        self._writer = await self._connect_retrying("streams-writer", deadline)
        await migrate(self._writer, self._parsed.schema)
        self._set_writer_pid()
        self._pool = await asyncpg.create_pool(
            self._parsed.dsn,
            min_size=1,
            max_size=self._reader_count,
            server_settings={
                "search_path": self._parsed.search_path,
                "application_name": "streams-reader",
            },
            reset=_keep_session,
        )
        self._listening = asyncio.Event()
        self._listener_task = asyncio.create_task(
            self._run_listener(), name=f"streams-listen:{self._parsed.schema}"
        )
        listening = asyncio.ensure_future(self._listening.wait())
        try:
            await asyncio.wait(
                [listening, self._listener_task],
                timeout=max(1.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            listening.cancel()
        if self._listener_task.done():
            self._listener_task.result()
        elif not self._listening.is_set():
            raise ConnectionError("the LISTEN connection did not come up in time")

    async def aclose(self) -> None:
        """Finish queued commits, stop the writer and the listener, close every connection."""
        if self._task is not None:
            await self._queue.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_connections()

    async def _close_connections(self) -> None:
        for batcher in (self._kv_gets, self._kv_scans, self._reads):
            await batcher.aclose()
        if self._listener_task is not None:
            self._listener_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener_task
            self._listener_task = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer.close()
            self._writer = None
            self._set_writer_pid()

    # -- cross-process wake-ups ------------------------------------------------------------

    def _on_notification(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid == self._writer_pid:
            return  # our own commit: its waiters were woken when it committed
        if self._partner is not None and pid == self._partner._writer_pid:
            return  # its names are handed over in this process (see ``_pair_with``)
        try:
            names = set(orjson.loads(payload))
        except orjson.JSONDecodeError:
            names = {"*"}
        if pid not in self._known.writers:  # another process's: our copies may be stale
            self._known.forget(names)
        self._wake(names)

    def _pair_with(self, partner: PostgresStore) -> None:
        """Stop hearing the notifications of ``partner``'s commits (a store of this process
        on the same schema, e.g. ``entities serve``'s, whose owner hands this store the names
        they touched at once instead). Another process's still wake this one."""
        self._partner = partner

    def _wake(self, names: set[str]) -> None:
        if "*" in names:
            self._notify_all()
        else:
            self._notify(names)

    async def _run_listener(self) -> None:
        """Keep one LISTEN connection; after a reconnect wake everything (we may have missed
        notifications meanwhile)."""
        delay = 0.05
        first = True
        while True:
            conn: Any = None
            try:
                conn = await self._connect("streams-listen")
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self._parsed.channel, self._on_notification)
                if not first:
                    logger.info("LISTEN connection re-established on %s", self._parsed.channel)
                    self._known.forget({"*"})
                    self._wake({"*"})
                first = False
                delay = 0.05
                self._listening.set()
                await lost.wait()
                logger.warning("LISTEN connection lost; reconnecting")
            except asyncio.CancelledError:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
                raise
            except _DISCONNECTED as exc:
                if first:
                    raise
                logger.warning("LISTEN connection failed (%s); retrying in %.2fs", exc, delay)
            if conn is not None:
                conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # -- writes ----------------------------------------------------------------------------

    async def commit(self, ops: Sequence[Op]) -> list[OpResult]:
        return await self._queue.submit(ops, self._task)

    async def _run_writer(self) -> None:
        async for group in self._queue.groups():
            await self._commit_isolated(group)
            self._used_at = time.monotonic()

    async def _commit_isolated(self, group: list[Pending]) -> None:
        """Commit ``group``; if the database rejects it, commit its calls one by one, so data
        the database cannot store (a NUL in a path, say) fails only the call that carries it."""
        try:
            await self._commit_group(group)
        except Exception as exc:
            rejected = isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _DISCONNECTED)
            if len(group) > 1 and rejected:
                logger.warning("group commit failed (%s); committing its calls one by one", exc)
                for pending in group:
                    if not pending.future.done():
                        await self._commit_isolated([pending])
                return
            error: Exception = exc
            if isinstance(exc, asyncpg.DataError):  # e.g. a NUL character in a path or key
                error = InvalidRequest(f"the database rejected the data: {exc}")
            elif isinstance(exc, asyncpg.exceptions.DiskFullError):  # rolled back whole
                error = StorageFull(f"the database server's disk is full: {exc}")
                logger.error("commit failed: %s", error)
            else:
                logger.exception("commit failed")
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(error)

    async def _commit_group(self, group: list[Pending]) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                loader, outcomes = await self._transaction(group)
            except _RETRYABLE as exc:
                if attempt >= _MAX_ATTEMPTS:
                    raise
                logger.debug("group commit retried after %s", type(exc).__name__)
                await asyncio.sleep(0.001 * attempt)
                continue
            except _NotCommitted as lost:
                # the connection dropped before COMMIT was sent: nothing was applied
                if attempt >= _MAX_ATTEMPTS:
                    raise lost.error from None
                logger.warning("writer connection lost (%s); reconnecting", lost.error)
                await self._reconnect_writer()
                continue
            except _DISCONNECTED:
                # lost during COMMIT: the outcome is unknown, so the callers must find out
                await self._reconnect_writer()
                raise
            break
        for pending, outcome in zip(group, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, StreamsError):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        self._learn(loader)
        self._committed(committed(succeeded(group, outcomes), loader.effects))

    def _learn(self, loader: GroupLoader | SpeculativeLoader) -> None:
        """Remember the rows a committed group read under its locks or wrote, as the commit
        left them (see :mod:`._postgres_speculate`)."""
        effects = loader.effects
        if isinstance(loader, SpeculativeLoader):
            self._known.learn(effects.streams.values(), effects.kv.items())
            return
        gone = [r.path for sid, r in loader.rows_by_id.items() if sid in effects.purged]
        read = [r for r in loader.rows.values() if r is not None and r.id not in effects.purged]
        self._known.learn(
            [*read, *effects.streams.values()],
            [*loader.kv_rows.items(), *effects.kv.items()],
            gone,
        )

    async def _reconnect_writer(self) -> None:
        if self._writer is not None:
            self._writer.terminate()
        self._begun = False
        self._writer = await self._connect_retrying(
            "streams-writer", time.monotonic() + self._connect_seconds
        )
        self._set_writer_pid()

    def _set_writer_pid(self) -> None:
        self._known.writers.discard(self._writer_pid or 0)
        self._writer_pid = None if self._writer is None else self._writer.get_server_pid()
        if self._writer_pid is not None:
            self._known.writers.add(self._writer_pid)

    async def _transaction(
        self, group: list[Pending]
    ) -> tuple[GroupLoader | SpeculativeLoader, list[list[OpResult] | StreamsError]]:
        conn = self._writer
        paths: set[str] = set()
        kv_keys: set[tuple[str, str]] = set()
        creates = 0
        producers: list[tuple[str, str]] = []
        for pending in group:
            for op in pending.ops:
                if isinstance(op, KvPut | KvCheck):
                    kv_keys.add((op.namespace, op.key))
                    continue
                if isinstance(op, Notify):
                    continue
                paths.add(op.path)
                if isinstance(op, Create):
                    creates += 1
                    if op.fork_from is not None:
                        paths.add(op.fork_from)
                elif isinstance(op, Append) and op.producer is not None:
                    producers.append((op.path, op.producer.id))
        schema = self._parsed.schema
        locks = sorted(
            {advisory_key(schema, "s", p) for p in paths}
            | {advisory_key(schema, "k", ns, key) for ns, key in kv_keys}
        )
        if conn.is_closed():
            raise _NotCommitted(ConnectionError("writer connection closed"))
        # validated against this process's copies first, when it has all it needs (no I/O)
        guess = None
        if not creates and not producers:
            guess = await speculate(self._known, [p.ops for p in group])
        if guess is not None:
            if not self._begun and time.monotonic() - self._used_at > _FRESH_SECONDS:
                await self._begin(conn)
            if await self._speculated(conn, locks, guess[0], guess[2]):
                return guess[0], guess[1]
        if not self._begun:  # else the last COMMIT began this transaction
            await self._begin(conn)
        loader, outcomes = await self._in_transaction(
            conn, self._apply(conn, group, locks, paths, kv_keys, creates, producers)
        )
        # the notifications, COMMIT and the next transaction's BEGIN: one round trip
        payloads = notification_payloads(loader.effects.touched)
        await self._end_transaction(conn, _commit(self._parsed.channel, payloads))
        self._begun = True
        return loader, outcomes

    async def _begin(self, conn: Any) -> None:
        """Open the writer's transaction. Raises what :meth:`_in_transaction` raises."""
        await self._in_transaction(conn, conn.execute("BEGIN"))
        self._begun = True

    async def _in_transaction(self, conn: Any, statements: Awaitable[_T]) -> _T:
        """Await ``statements`` of the writer's open transaction (before its ``COMMIT``).

        Raises:
            _NotCommitted: the connection failed (the transaction died with it: nothing
                committed, the group may run again on a new connection).
            BaseException: whatever else they raised, once the transaction is rolled back.
        """
        try:
            return await statements
        except _DISCONNECTED as exc:
            self._begun = False
            raise _NotCommitted(exc) from exc
        except BaseException:
            self._begun = False
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            raise

    async def _end_transaction(self, conn: Any, sql: str) -> None:
        """Send ``sql``, which commits the writer's open transaction; the writer is in none
        after it (unless ``sql`` begins the next one: the caller says so).

        Raises:
            asyncpg.PostgresError: a failed commit, rolled back; a lost connection, whose
                outcome is unknown.
        """
        self._begun = False
        try:
            await conn.execute(sql)
        except asyncpg.PostgresError as exc:
            if not isinstance(exc, _DISCONNECTED):
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
            raise

    async def _speculated(
        self, conn: Any, locks: list[int], loader: SpeculativeLoader, args: list[Any]
    ) -> bool:
        """Commit a group validated against this process's copies with the schema's
        ``speculate`` function (see :mod:`._postgres_speculate`): one round trip, the call
        being a transaction of its own, when no transaction is open (the last group was
        speculated too); else the call and ``COMMIT``. ``False`` when a copy was stale: nothing
        was written, and the group is to run the ordinary way (in the transaction still open,
        holding the locks, if there was one).

        Raises:
            _NotCommitted: the connection failed before anything could commit.
            asyncpg.PostgresError: as the ordinary way does (a lost connection during the
                commit: the outcome is unknown).
        """
        payloads = notification_payloads(loader.effects.touched)
        call = (SPECULATE_SQL, locks, *args, self._parsed.channel, payloads)
        if not self._begun:
            ok = await conn.fetchval(*call)  # commits by itself (if it wrote)
        else:
            ok = await self._in_transaction(conn, conn.fetchval(*call))
            if ok:
                await self._end_transaction(conn, "COMMIT")
        self.speculations["hit" if ok else "miss"] += 1
        return bool(ok)

    async def _apply(
        self,
        conn: Any,
        group: list[Pending],
        locks: list[int],
        paths: set[str],
        kv_keys: set[tuple[str, str]],
        creates: int,
        producers: list[tuple[str, str]],
    ) -> tuple[GroupLoader, list[list[OpResult] | StreamsError]]:
        """The transaction's body: lock and load, validate every call, persist."""
        ids: list[int] = []
        if creates:
            ids = list(
                await conn.fetchval(
                    "SELECT array_agg(nextval('stream_ids')) FROM generate_series(1, $1)",
                    creates,
                )
            )
            ids.reverse()
        loader = GroupLoader(conn, ids)
        await loader.lock_and_read(locks, sorted(paths), sorted(kv_keys))
        wanted_producers = []
        for path, producer_id in producers:
            record = loader.rows.get(path)
            if record is not None:
                wanted_producers.append((record.id, producer_id))
        await loader.prefetch_producers(wanted_producers)
        outcomes = await apply_each(loader, (p.ops for p in group), loader.merge)
        await persist(conn, loader.effects)
        return loader, outcomes

    # -- reads -----------------------------------------------------------------------------

    async def _reading(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """``fn(conn, *args)`` on a pooled connection; run again (with backoff, up to
        ``connect_seconds``) while connections fail, e.g. across a server restart (reads are
        idempotent)."""
        deadline = time.monotonic() + self._connect_seconds
        delay = 0.02
        while True:
            if self._pool is None:
                raise StreamsError("store is not open", path="")
            try:
                async with self._pool.acquire() as conn:
                    return await fn(conn, *args)
            except _DISCONNECTED as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("read failed (%s); retrying in %.2fs", exc, delay)
            except asyncpg.DataError as exc:  # e.g. a NUL character in a path or key
                raise InvalidRequest(f"the database rejected the data: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def head(self, path: str) -> StreamInfo:
        return await self._reading(self._head, path)

    async def _head(self, conn: Any, path: str) -> StreamInfo:
        row = await conn.fetchrow(
            f"SELECT {', '.join('s.' + c for c in COLUMNS.split(', '))}, p.path AS parent_path "
            "FROM streams s LEFT JOIN streams p ON p.id = s.fork_parent WHERE s.path=$1",
            path,
        )
        record = self._live(path, row)
        return record.info(row["parent_path"] if record.fork_parent is not None else None)

    @staticmethod
    def _live(path: str, row: Any) -> StreamRecord:
        record = None if row is None else to_record(row)
        return readable(record, path)

    async def read(
        self,
        path: str,
        offset: str = "-1",
        *,
        limit: int = 1000,
        max_bytes: int | None = None,
        renew_ttl: bool = True,
    ) -> ReadResult:
        parsed = parse_offset(offset, path=path)
        # one round trip (shared with concurrent reads): the record and, unless the stream is a
        # fork, the messages after the offset
        row = await self._reads.get((path, _NEVER if parsed is None else parsed, limit))
        record = self._live(path, row)
        start = read_start(record, offset, parsed)
        if record.fork_parent is None:
            read = ReadBuilder(start, limit, max_bytes)
            for row_position, data in zip(
                row["m_positions"] or (), row["m_data"] or (), strict=True
            ):
                if not read.add(int(row_position), bytes(data)):
                    break
            read.reach(record.length)
        else:  # its history spans its ancestors: read them on one connection
            read = await self._reading(self._read_fork, record, start, limit, max_bytes)
        if renew_ttl and record.ttl_seconds is not None:
            await self.commit([Touch(path)])
        return read.result(record)

    async def _read_many(self, wanted: Sequence[tuple[str, int, int]]) -> list[Any]:
        rows = await self._reading(fetch, _READ_MANY, *columns(wanted))
        found: list[Any] = [None] * len(wanted)
        for row in rows:
            found[row["i"] - 1] = row
        return found

    async def _read_fork(
        self, conn: Any, record: StreamRecord, start: int, limit: int, max_bytes: int | None
    ) -> ReadBuilder:
        """The messages of fork ``record`` after ``start``, from the streams its history spans
        (:func:`read_plan`); all read afresh if ``_reading`` runs it again."""
        read = ReadBuilder(start, limit, max_bytes)
        for sid, low, high in await read_plan(record, start, ReadLoader(conn).stream_by_id):
            if read.full:
                break
            rows = await conn.fetch(
                "SELECT position, data FROM messages WHERE stream_id=$1 AND position>$2 "
                "AND position<=$3 ORDER BY position LIMIT $4",
                sid,
                low,
                high,
                read.room,
            )
            for row_position, data in rows:
                if not read.add(int(row_position), bytes(data)):
                    break
            read.reach(high)
        return read

    async def schema_versions(self) -> tuple[int, int]:
        table = f"{quote_ident(self._parsed.schema)}.schema_version"
        rows = await self._reading(fetch, f"SELECT max(version) FROM {table}")
        applied = rows[0][0] if rows else None
        return (0 if applied is None else int(applied)), len(MIGRATIONS)

    async def kv_get(self, namespace: str, key: str) -> bytes | None:
        return await self._kv_gets.get((namespace, key))

    async def _kv_get_many(self, wanted: Sequence[tuple[str, str]]) -> list[bytes | None]:
        rows = await self._reading(fetch, _KV_GET_MANY, *columns(wanted))
        found: list[bytes | None] = [None] * len(wanted)
        for i, value in rows:
            found[i - 1] = bytes(value)
        return found

    async def kv_scan(
        self,
        namespace: str,
        prefix: str = "",
        *,
        after: str | None = None,
        end: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, bytes]]:
        lower, inclusive, upper = kv_range(prefix, after, end)
        return await self._kv_scans.get((namespace, lower, inclusive, upper, limit))

    async def _kv_scan_many(self, wanted: Sequence[_KvScan]) -> list[list[tuple[str, bytes]]]:
        rows = await self._reading(fetch, _KV_SCAN_MANY, *columns(wanted))
        found: list[list[tuple[str, bytes]]] = [[] for _ in wanted]
        for i, key, value in rows:
            found[i - 1].append((str(key), bytes(value)))
        return found
