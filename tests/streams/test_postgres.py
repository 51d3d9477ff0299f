"""PostgreSQL-only behaviour: several store objects (as several processes would hold) on one schema.

Each store has its own writer connection, reader pool and LISTEN connection, so what holds between
two stores here holds between two processes: appends stay gapless and contiguous, exactly one
compare-and-set wins, NOTIFY wakes the other store's waiters, and migrations may race.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import pytest

import streams
from streams import BackendUnavailable, ConditionFailed, KvCheck, KvPut, Store, open_store
from streams._backends import postgres as postgres_backend
from streams._backends._postgres_schema import MIGRATIONS, parse_url, quote_ident
from streams._backends._postgres_speculate import Unknown
from streams._backends.postgres import PostgresStore, notification_payloads
from tests import _postgres

pytestmark = _postgres.marks()

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def url() -> AsyncIterator[str]:
    _postgres.check()
    fresh = _postgres.fresh_url()
    yield fresh
    await _postgres.drop_schema(fresh)


@pytest.fixture
async def two(url: str) -> AsyncIterator[tuple[Store, Store]]:
    async with open_store(url) as a, open_store(url) as b:
        yield a, b


async def read_all(store: Store, path: str) -> list[streams.Message]:
    out: list[streams.Message] = []
    offset = "-1"
    while True:
        result = await store.read(path, offset)
        out.extend(result.messages)
        offset = result.next_offset
        if result.up_to_date:
            return out


async def test_concurrent_appends_from_two_stores_are_gapless_and_contiguous(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    await a.create("s")

    async def writer(store: Store, name: str, batches: int) -> list[tuple[str, int]]:
        acked = []
        for batch in range(batches):
            size = 1 + (batch % 4)
            data = [orjson.dumps([name, batch, i]) for i in range(size)]
            result = await store.append("s", data)
            acked.append((result.next_offset, size))
        return acked

    jobs = [writer(store, f"{tag}{n}", 25) for n in range(6) for tag, store in (("a", a), ("b", b))]
    acks = await asyncio.gather(*jobs)
    messages = await read_all(b, "s")
    expected = sum(size for acked in acks for _offset, size in acked)
    assert len(messages) == expected
    assert [m.offset for m in messages] == [streams.format_offset(i + 1) for i in range(expected)]
    decoded = [orjson.loads(m.data) for m in messages]
    index = 0
    while index < len(decoded):  # every batch sits in one contiguous run, in order
        name, batch, first = decoded[index]
        assert first == 0
        size = 1 + (batch % 4)
        assert decoded[index : index + size] == [[name, batch, i] for i in range(size)]
        index += size
    offsets = {offset for acked in acks for offset, _size in acked}
    assert len(offsets) == sum(len(acked) for acked in acks)  # no two batches share a tail


_APPENDER = """
import asyncio, sys
import orjson
import streams

async def main(url, name, batches):
    async with streams.open_store(url) as store:
        for batch in range(batches):
            size = 1 + batch % 3
            await store.append("s", [orjson.dumps([name, batch, i]) for i in range(size)])

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _assert_appended_whole(messages: list[streams.Message], expected: int) -> None:
    """``messages`` are the ``expected`` messages of :data:`_APPENDER`-style batches (``1 +
    batch % 3`` each) at offsets 1.., every batch in one contiguous run, in order."""
    decoded = [orjson.loads(m.data) for m in messages]
    assert len(decoded) == expected
    assert [m.offset for m in messages] == [streams.format_offset(i + 1) for i in range(expected)]
    index = 0
    while index < len(decoded):
        name, batch, _ = decoded[index]
        size = 1 + batch % 3
        assert decoded[index : index + size] == [[name, batch, i] for i in range(size)]
        index += size


async def test_separate_processes_append_gapless_and_wake_each_other(url: str) -> None:
    async with open_store(url) as store:
        await store.create("s")
        seen = 0
        woken = 0
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", _APPENDER, url, f"p{i}", "60", cwd=ROOT
            )
            for i in range(3)
        ]
        expected = 3 * sum(1 + b % 3 for b in range(60))
        with anyio.fail_after(60):
            while seen < expected:  # only NOTIFY from the other processes wakes this wait
                if await store.wait("s", streams.format_offset(seen), 10):
                    woken += 1
                seen = streams.parse_offset((await store.head("s")).next_offset) or 0
        assert [await p.wait() for p in procs] == [0, 0, 0]
        messages = await read_all(store, "s")
    assert woken > 0
    _assert_appended_whole(messages, expected)


async def test_compare_and_set_race_has_exactly_one_winner(two: tuple[Store, Store]) -> None:
    a, b = two
    for round_ in range(30):
        key = f"lease-{round_}"
        current = None if round_ % 2 else b"old"
        if current is not None:
            await a.kv_put("leases", key, current)

        async def claim(
            store: Store, who: bytes, key: str = key, expect: bytes | None = current
        ) -> bool:
            try:
                await store.commit([KvCheck("leases", key, expect), KvPut("leases", key, who)])
            except ConditionFailed:
                return False
            return True

        wins = await asyncio.gather(*(claim(s, w) for s, w in ((a, b"A"), (b, b"B")) * 3))
        assert sum(wins) == 1
        winner = await a.kv_get("leases", key)
        assert winner in {b"A", b"B"}


async def test_conditional_put_on_absent_key_has_exactly_one_winner(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    for round_ in range(30):
        key = f"k{round_}"
        results = await asyncio.gather(
            *(
                store.commit([KvPut("ns", key, tag, only_if=True, expect=None)])
                for store, tag in ((a, b"A"), (b, b"B"), (a, b"C"), (b, b"D"))
            )
        )
        assert [r[0] for r in results].count(True) == 1


async def test_concurrent_creates_of_one_path_create_it_once(two: tuple[Store, Store]) -> None:
    a, b = two
    results = await asyncio.gather(*(s.create(f"c{i % 5}") for i in range(20) for s in (a, b)))
    assert sum(r.created for r in results) == 5


async def test_data_the_database_rejects_fails_only_its_own_commit(
    two: tuple[Store, Store],
) -> None:
    a, _b = two
    results = await asyncio.gather(
        a.create("ok-1"), a.create("bad\x00path"), a.create("ok-2"), return_exceptions=True
    )
    assert isinstance(results[1], streams.InvalidRequest)
    assert [type(r) for r in (results[0], results[2])] == [streams.CreateResult] * 2
    assert (await a.head("ok-2")).path == "ok-2"
    # text no database can store (a lone surrogate) fails its own commit, not its group's
    puts = await asyncio.gather(
        a.kv_put("ns", "ok-1", b"1"),
        a.kv_put("ns", "bad\udcff", b"2"),
        a.kv_put("ns", "ok-2", b"3"),
        return_exceptions=True,
    )
    assert isinstance(puts[1], streams.InvalidRequest)
    assert [await a.kv_get("ns", k) for k in ("ok-1", "ok-2")] == [b"1", b"3"]


async def test_wait_on_one_store_wakes_when_another_appends(two: tuple[Store, Store]) -> None:
    a, b = two
    await a.create("live")
    latencies = []
    for n in range(20):
        waiter = asyncio.create_task(b.wait("live", streams.format_offset(n), 5))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        await a.append("live", [b"x"])
        assert await asyncio.wait_for(waiter, 2) is True
        latencies.append(time.perf_counter() - started)
    # measured from the append call (commit included) to the remote waiter waking
    assert statistics.median(latencies) < 0.05, latencies


async def test_listen_and_wait_signal_fire_for_other_stores_kv_writes(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    heard = asyncio.Event()
    remove = b.listen("kv:pending", heard.set)
    try:
        signal = asyncio.create_task(b.wait_signal("kv:pending", 5))
        await asyncio.sleep(0.01)
        await a.kv_put("pending", "x", b"1")
        await asyncio.wait_for(heard.wait(), 2)
        assert await signal is True
    finally:
        remove()


async def test_wait_times_out_without_remote_appends(two: tuple[Store, Store]) -> None:
    a, b = two
    await a.create("quiet")
    await a.create("busy")
    waiter = asyncio.create_task(b.wait("quiet", streams.format_offset(0), 0.3))
    await asyncio.sleep(0.05)
    await a.append("busy", [b"x"])
    assert await waiter is False


async def test_listener_reconnects_and_wakes_waiters(two: tuple[Store, Store]) -> None:
    a, b = two
    await a.create("s")
    assert isinstance(b, PostgresStore)
    conn = await asyncpg.connect(parse_url(b.url).dsn)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'streams-listen'"
        )
        assert killed >= 1
    finally:
        await conn.close()
    deadline = time.monotonic() + 10
    position = 0
    while True:  # once LISTEN is back, a remote append wakes b's waiter again
        waiter = asyncio.create_task(b.wait("s", streams.format_offset(position), 0.5))
        await asyncio.sleep(0.05)
        await a.append("s", [b"x"])
        position += 1
        if await waiter:
            break
        assert time.monotonic() < deadline, "LISTEN did not come back"


async def test_writer_and_readers_reconnect_after_their_connections_are_killed(
    two: tuple[Store, Store],
) -> None:
    a, _b = two
    await a.create("s", messages=[b"1"])
    await a.kv_put("ns", "k", b"v")
    conn = await asyncpg.connect(parse_url(a.url).dsn)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name IN ('streams-writer', 'streams-reader')"
        )
        assert killed >= 4
    finally:
        await conn.close()
    await asyncio.sleep(0.1)
    assert (await a.append("s", [b"2"])).next_offset == streams.format_offset(2)
    assert [m.data for m in await read_all(a, "s")] == [b"1", b"2"]
    assert await a.kv_get("ns", "k") == b"v"
    assert await a.kv_scan("ns") == [("k", b"v")]


async def _writer_state(url: str, store: PostgresStore) -> tuple[str, Any, Any]:
    conn = await asyncpg.connect(parse_url(url).dsn)
    try:
        row = await conn.fetchrow(
            "SELECT state, backend_xid, backend_xmin FROM pg_stat_activity WHERE pid = $1",
            store._writer_pid,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["state"], row["backend_xid"], row["backend_xmin"]


async def test_the_writer_waits_in_a_transaction_that_holds_nothing_back(url: str) -> None:
    """Between groups the writer's connection sits in the transaction the last ordinary
    group's COMMIT began (no transaction id, no snapshot: nothing held back from vacuum; exempt
    from ``idle_in_transaction_session_timeout``), or, after a speculated group (whose call is
    a transaction of its own when none is open), in none."""
    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        await store.create("s", messages=[b"1"])  # a create: always the ordinary way
        assert await _writer_state(url, store) == ("idle in transaction", None, None)
        writer = store._writer
        assert writer is not None
        assert await writer.fetchval("SHOW idle_in_transaction_session_timeout") == "0"
        await store.kv_put("ns", "k", b"v")  # speculated, in the open transaction, committed
        assert await _writer_state(url, store) == ("idle", None, None)
        hits = store.speculations["hit"]
        await store.append("s", [b"2"])  # speculated: a transaction of its own
        assert store.speculations["hit"] == hits + 1
        assert await _writer_state(url, store) == ("idle", None, None)
        await store.create("t")
        assert await _writer_state(url, store) == ("idle in transaction", None, None)
        assert [m.data for m in await read_all(store, "s")] == [b"1", b"2"]


async def test_appends_survive_connections_killed_under_load(two: tuple[Store, Store]) -> None:
    a, b = two
    await a.create("s")
    acked: set[bytes] = set()
    unknown: set[bytes] = set()

    async def writer(store: Store, name: str) -> None:
        for n in range(40):
            data = f"{name}-{n}".encode()
            try:
                await store.append("s", [data])
            except Exception:  # lost during COMMIT: it may or may not have landed
                unknown.add(data)
            else:
                acked.add(data)

    async def killer() -> None:
        conn = await asyncpg.connect(parse_url(a.url).dsn)
        try:
            for _ in range(3):
                await asyncio.sleep(0.05)
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'streams-%' AND pid <> pg_backend_pid()"
                )
        finally:
            await conn.close()

    await asyncio.gather(
        killer(),
        *(writer(store, f"{tag}{i}") for i in range(4) for tag, store in (("a", a), ("b", b))),
    )
    messages = await read_all(a, "s")
    stored = [m.data for m in messages]
    assert len(stored) == len(set(stored))  # nothing applied twice
    assert acked <= set(stored) <= acked | unknown
    assert [m.offset for m in messages] == [
        streams.format_offset(i + 1) for i in range(len(messages))
    ]
    assert len(acked) >= 200  # most appends went through despite the kills
    waiter = asyncio.create_task(b.wait("s", messages[-1].offset, 5))
    await asyncio.sleep(0.3)
    await a.append("s", [b"after"])  # and NOTIFY works again
    assert await asyncio.wait_for(waiter, 5) is True


async def test_migrations_run_concurrently_from_several_stores(url: str) -> None:
    stores = [open_store(url) for _ in range(6)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[0].create("s", messages=[b"1"])
        assert [m.data for m in await read_all(stores[5], "s")] == [b"1"]
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))
    parsed = parse_url(url)
    conn = await asyncpg.connect(parsed.dsn)
    try:
        versions = await conn.fetch(
            f"SELECT version FROM {quote_ident(parsed.schema)}.schema_version ORDER BY version"
        )
    finally:
        await conn.close()
    assert [row[0] for row in versions] == list(range(1, len(MIGRATIONS) + 1))


async def test_a_version_1_schema_is_migrated_in_place(url: str) -> None:
    """A schema created by an older release (version 1) keeps its data and gets the later
    migrations (version 2: fillfactor 70 on the update-heavy tables) when a store opens it."""
    parsed = parse_url(url)
    schema = quote_ident(parsed.schema)
    conn = await asyncpg.connect(parsed.dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}; SET search_path TO {schema}")
        await conn.execute(MIGRATIONS[0])
        await conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now()); "
            "INSERT INTO schema_version (version) VALUES (1); "
            "INSERT INTO kv VALUES ('ns', 'old', 'kept')"
        )
    finally:
        await conn.close()
    async with open_store(url) as store:
        assert await store.kv_get("ns", "old") == b"kept"
        await store.kv_put("ns", "new", b"v")
    conn = await asyncpg.connect(parsed.dsn)
    try:
        versions = await conn.fetch(f"SELECT version FROM {schema}.schema_version ORDER BY 1")
        options = await conn.fetch(
            "SELECT relname, reloptions FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND relname IN ('kv', 'streams')",
            parsed.schema,
        )
    finally:
        await conn.close()
    assert [row[0] for row in versions] == list(range(1, len(MIGRATIONS) + 1))
    assert {row[0]: row[1] for row in options} == {
        "kv": ["fillfactor=70"],
        "streams": ["fillfactor=70"],
    }


async def test_data_survives_reopen(url: str) -> None:
    async with open_store(url) as store:
        await store.create("s", messages=[b"a", b"b"])
        await store.kv_put("ns", "k", b"v")
    async with open_store(url) as store:
        assert [m.data for m in await read_all(store, "s")] == [b"a", b"b"]
        assert await store.kv_get("ns", "k") == b"v"


def test_schema_option_must_be_an_identifier() -> None:
    with pytest.raises(BackendUnavailable):
        open_store("postgresql://localhost/db?schema=bad;name")
    assert parse_url("postgresql://localhost/db?schema=abc&sslmode=disable").schema == "abc"
    assert parse_url("postgresql://localhost/db?search_path=x1").schema == "x1"
    assert parse_url("postgresql://localhost/db").schema == "public"
    assert "schema" not in parse_url("postgresql://localhost/db?schema=abc").dsn


def test_notification_payloads_stay_under_the_limit() -> None:
    names = {f"stream/{i:05d}/{'x' * 40}" for i in range(2000)}
    payloads = notification_payloads(names)
    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 for p in payloads)
    assert {n for p in payloads for n in orjson.loads(p)} == names
    assert notification_payloads(["y" * 9000]) == ['["*"]']


async def test_concurrent_reads_are_coalesced_and_answer_as_one_by_one(url: str) -> None:
    """Reads made together share queries (see ``_postgres_batch``) yet each gets exactly what it
    would get alone: missing keys and streams, scan bounds, limits, forks, TTL renewals."""
    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        await store.commit([KvPut("ns", f"k{i:02}", f"v{i}".encode()) for i in range(30)])
        await store.commit([KvPut("other", "k05", b"x")])
        for n in range(6):
            await store.create(f"s{n}")
            if n:
                await store.append(f"s{n}", [f"{n}-{i}".encode() for i in range(n * 3)])
        await store.create(
            "fork", fork_from="s5", fork_offset=(await store.read("s5", limit=4)).next_offset
        )
        await store.append("fork", [b"own"])

        calls: list[Callable[[], Awaitable[Any]]] = [
            *(lambda k=k: store.kv_get("ns", k) for k in ("k00", "k07", "nope", "k29", "k07")),
            lambda: store.kv_get("other", "k05"),
            lambda: store.kv_scan("ns"),
            lambda: store.kv_scan("ns", "k1"),
            lambda: store.kv_scan("ns", after="k27"),
            lambda: store.kv_scan("ns", end="k03"),
            lambda: store.kv_scan("ns", limit=4),
            lambda: store.kv_scan("missing"),
            *(lambda n=n: store.read(f"s{n}") for n in range(6)),
            lambda: store.read("s4", limit=5),
            lambda: store.read("s5", max_bytes=8),
            lambda: store.read("fork"),
        ]
        alone = [await call() for call in calls]
        queries = 0
        original = store._reading

        async def counting(fn: Any, *args: Any) -> Any:
            nonlocal queries
            queries += 1
            return await original(fn, *args)

        store._reading = counting  # type: ignore[method-assign]
        together = await asyncio.gather(*(call() for call in calls))
        assert list(together) == alone
        assert queries < len(calls) // 2, queries  # coalesced, not one query per read
        with pytest.raises(streams.StreamNotFound):
            await asyncio.gather(store.read("s1"), store.read("absent"))


def _record_writes(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements ``store``'s writer sends from now on (until ``monkeypatch.undo()``)."""
    writer = store._writer
    assert writer is not None
    sent: list[str] = []
    for name in ("execute", "fetch", "fetchrow", "fetchval", "executemany"):
        original = getattr(asyncpg.connection.Connection, name)

        async def wrapped(
            self: Any, query: str, *args: Any, _original: Any = original, **kwargs: Any
        ) -> Any:
            if self is writer:
                sent.append(query)
            return await _original(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.connection.Connection, name, wrapped)
    return sent


async def test_a_commit_of_rows_this_process_does_not_know_is_three_round_trips(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The locks, the locked stream rows and the side-table values in one query; every write in
    one statement; the notifications with COMMIT and the next transaction's BEGIN (so a commit
    after an ordinary one sends no BEGIN of its own). Quiet writes signal no one."""
    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        await store.create("s")
        await store.commit([KvPut("ns", "gone", b"x"), KvPut("other", "k", b"1")])
        store._known.forget({"*"})  # as if another process had written them since
        await store.create("u")  # the ordinary way: its COMMIT begins the next transaction
        before = dict(store.speculations)
        sent = _record_writes(store, monkeypatch)
        heard: list[str] = []
        store.listen("kv:ns", lambda: heard.append("ns"))
        store.listen("kv:other", lambda: heard.append("other"))
        await store.commit(
            [
                streams.Append("s", [b"a", b"b"]),
                KvCheck("other", "k", b"1"),
                KvPut("ns", "new", b"y"),
                KvPut("ns", "gone", None, quiet=True),
            ]
        )
        assert len(sent) == 3, sent
        assert "lock_and_read" in sent[0] and sent[-1].endswith("COMMIT; BEGIN")
        assert store.speculations == before  # not tried: nothing to validate against
        assert heard == ["ns"]  # for the put; the quiet removal signals nothing
        monkeypatch.undo()
        assert [m.data for m in await read_all(store, "s")] == [b"a", b"b"]
        assert await store.kv_get("ns", "new") == b"y"
        assert await store.kv_get("ns", "gone") is None
        # a quiet removal alone signals nothing at all
        heard.clear()
        await store.commit([KvPut("ns", "new", None, quiet=True)])
        assert heard == [] and await store.kv_get("ns", "new") is None


async def test_a_commit_of_rows_this_process_knows_is_one_round_trip(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validated against the copies this process kept of the rows it wrote, then checked,
    written and notified by one call under the locks, a transaction of its own: the same
    outcomes, results and signals, here and in another store."""
    monkeypatch.setattr(postgres_backend, "_FRESH_SECONDS", 3600.0)  # however slow the host
    async with open_store(url) as store, open_store(url) as elsewhere:
        assert isinstance(store, PostgresStore)
        await store.create("s")
        await store.append("s", [b"a"])
        await store.commit([KvPut("ns", "gone", b"x"), KvPut("other", "k", b"1")])
        hits = store.speculations["hit"]
        sent = _record_writes(store, monkeypatch)
        heard: list[str] = []
        store.listen("kv:ns", lambda: heard.append("ns"))
        signalled = anyio.Event()
        elsewhere.listen("kv:ns", signalled.set)
        results = await store.commit(
            [
                streams.Append("s", [b"b", b"c"]),
                KvCheck("other", "k", b"1"),
                KvPut("ns", "new", b"y"),
                KvPut("ns", "gone", None, quiet=True),
                KvPut("other", "k", b"9", only_if=True, expect=b"wrong"),  # not applied
            ]
        )
        with anyio.fail_after(5):
            await signalled.wait()  # its NOTIFY went with it
        with pytest.raises(ConditionFailed):  # a check against a copy fails as it would
            await store.commit([KvCheck("other", "k", b"2"), KvPut("ns", "never", b"1")])
        assert len(sent) == 2, sent
        assert all(q.startswith("SELECT speculate(") for q in sent), sent
        assert store.speculations == {"hit": hits + 2, "miss": 0}
        assert heard == ["ns"]
        monkeypatch.undo()
        append = results[0]
        assert isinstance(append, streams.AppendResult)
        assert append.next_offset == streams.format_offset(3)
        assert results[1:] == [None, True, True, False]
        assert [m.data for m in await read_all(store, "s")] == [b"a", b"b", b"c"]
        assert await store.kv_get("ns", "new") == b"y"
        assert await store.kv_get("ns", "gone") is None
        assert await store.kv_get("other", "k") == b"1"
        assert await store.kv_get("ns", "never") is None


async def test_a_writer_idle_for_a_while_opens_a_transaction_before_it_speculates(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that died while the writer was idle fails on ``BEGIN``, before anything
    could commit, and the group runs again on a new one: the caller sees no error."""
    monkeypatch.setattr(postgres_backend, "_FRESH_SECONDS", 0.0)  # always idle "for a while"
    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        await store.create("s")
        await store.append("s", [b"1"])
        sent = _record_writes(store, monkeypatch)
        await store.append("s", [b"2"])
        assert [q[:16] for q in sent] == ["BEGIN", "SELECT speculate", "COMMIT"]
        await _behind_its_back(url, f"SELECT pg_terminate_backend({store._writer_pid})")
        hits = store.speculations["hit"]
        assert (await store.append("s", [b"3"])).next_offset == streams.format_offset(3)
        assert store.speculations["hit"] == hits + 1
        assert [m.data for m in await read_all(store, "s")] == [b"1", b"2", b"3"]


async def _behind_its_back(url: str, *statements: str) -> None:
    """Change the schema of ``url`` directly, notifying no one (as a write this process did
    not hear about: a quiet side-table write, or one whose notification is still on its way)."""
    parsed = parse_url(url)
    conn = await asyncpg.connect(parsed.dsn)
    try:
        await conn.execute(f"SET search_path TO {quote_ident(parsed.schema)}")
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_a_stale_copy_costs_a_round_trip_never_a_wrong_commit(url: str) -> None:
    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        await store.create("s")
        await store.append("s", [b"a"])
        await store.commit([KvPut("ns", "k", b"1")])
        await _behind_its_back(
            url,
            "UPDATE kv SET value = '\\x32'::bytea WHERE namespace = 'ns' AND key = 'k'",
            "INSERT INTO messages (stream_id, position, data) "
            "SELECT id, length + 1, '\\x62'::bytea FROM streams WHERE path = 's'",
            "UPDATE streams SET length = length + 1 WHERE path = 's'",
        )
        hits = store.speculations["hit"]
        with pytest.raises(ConditionFailed):  # its copy still says 1
            await store.commit([KvCheck("ns", "k", b"1"), KvPut("ns", "k", b"3")])
        assert store.speculations == {"hit": hits, "miss": 1}
        result = await store.append("s", [b"c"])  # its copy of s is one message behind
        assert result.next_offset == streams.format_offset(3)
        assert store.speculations == {"hit": hits, "miss": 2}
        await store.commit([KvCheck("ns", "k", b"2"), KvPut("ns", "k", b"4")])
        await store.append("s", [b"d"])  # the copies are current again
        assert store.speculations == {"hit": hits + 2, "miss": 2}
        assert await store.kv_get("ns", "k") == b"4"
        assert [m.data for m in await read_all(store, "s")] == [b"a", b"b", b"c", b"d"]


async def test_another_process_s_notification_drops_the_copies_it_names(url: str) -> None:
    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        await store.create("s")
        await store.create("t")
        await store.append("s", [b"a"])
        await store.append("t", [b"a"])
        await store.commit([KvPut("ns", "k", b"1")])
        hits = store.speculations["hit"]
        payload = orjson.dumps(["s", "kv:ns"]).decode()
        await _behind_its_back(url, f"SELECT pg_notify('{store._parsed.channel}', '{payload}')")
        with anyio.fail_after(5):
            while True:
                try:
                    store._known.stream("s")
                except Unknown:
                    break
                await asyncio.sleep(0.01)
        with pytest.raises(Unknown):
            store._known.kv("ns", "k")
        assert store._known.stream("t").length == 1  # not named: kept
        await store.append("s", [b"b"])  # read under the locks again: no speculation
        await store.append("t", [b"b"])
        assert store.speculations == {"hit": hits + 1, "miss": 0}


async def test_stores_of_one_process_share_their_copies(two: tuple[Store, Store]) -> None:
    a, b = two
    assert isinstance(a, PostgresStore) and isinstance(b, PostgresStore)
    await a.create("s")
    await a.append("s", [b"a"])
    await a.commit([KvPut("ns", "k", b"1")])
    assert b.speculations == {"hit": 0, "miss": 0}
    await b.commit([KvCheck("ns", "k", b"1"), KvPut("ns", "k", b"2")])  # b never read either
    assert (await b.append("s", [b"b"])).next_offset == streams.format_offset(2)
    assert b.speculations == {"hit": 2, "miss": 0}
    assert (await a.append("s", [b"c"])).next_offset == streams.format_offset(3)
    assert a.speculations["miss"] == 0


async def test_this_process_and_others_appending_and_racing_stay_exact(url: str) -> None:
    """Stores of this process (sharing their copies) and of other processes append to one
    stream: gapless, every batch contiguous; then this process's stores race to bump a counter
    by compare-and-set: no update is lost."""
    async with open_store(url) as a, open_store(url) as b:
        assert isinstance(a, PostgresStore) and isinstance(b, PostgresStore)
        await a.create("s")
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", _APPENDER, url, f"p{i}", "60", cwd=ROOT
            )
            for i in range(2)
        ]

        async def writer(store: Store, name: str) -> None:
            for batch in range(60):
                await store.append(
                    "s", [orjson.dumps([name, batch, i]) for i in range(1 + batch % 3)]
                )

        async def counter(store: Store, times: int) -> int:
            won = 0
            for _ in range(times):
                current = await store.kv_get("ns", "n")
                bumped = str(int(current or b"0") + 1).encode()
                try:
                    await store.commit([KvCheck("ns", "n", current), KvPut("ns", "n", bumped)])
                except ConditionFailed:
                    continue
                won += 1
            return won

        with anyio.fail_after(120):
            await asyncio.gather(writer(a, "a"), writer(b, "b"))
            wins = await asyncio.gather(*(counter(s, 30) for s in (a, b, a, b)))
            assert [await p.wait() for p in procs] == [0, 0]
        assert await a.kv_get("ns", "n") == str(sum(wins)).encode()  # no update lost
        messages = await read_all(a, "s")
    _assert_appended_whole(messages, 4 * sum(1 + b % 3 for b in range(60)))
    assert a.speculations["hit"] + b.speculations["hit"] > 0
    assert a.speculations["miss"] + b.speculations["miss"] > 0  # the others' appends, unheard
