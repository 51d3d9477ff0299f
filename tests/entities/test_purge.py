"""Purge: ``Runtime.purge`` (and ``DELETE …?purge=true``) removes an entity's stream and every
side-table row about it, in one transaction; the URL is free afterwards and a new entity there
sees nothing of the old one; children are kept unless the purge is recursive; a wake running
when the entity is purged is fenced and resurrects nothing.

"Every row" is checked by reading the database's whole side table (every namespace) and its
stream table directly, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator

import anyio
import httpx2
import orjson
import pytest
from pydantic import BaseModel

from entities import (
    EntityNotFound,
    HandlerContext,
    Registry,
    Runtime,
    WakeEvent,
    collection,
    entity,
)
from entities._purge import SUBSCRIPTIONS_NS
from entities.server import create_app
from entities.server._access import required
from streams import KvPut, StreamNotFound
from tests._live import serving

NEW = 60  # messages to the new entity at a purged URL before its first wake
ROOT, KID, GRANDKID, WATCHED, WATCHER = "/p/root", "/p/kid", "/p/grandkid", "/p/seen", "/w/w1"


class Note(BaseModel):
    key: str
    text: str


class Probe:
    """What the handlers saw, and a gate a ``block`` message waits on."""

    def __init__(self) -> None:
        self.notes_seen: list[int] = []  # rows in ``notes`` at each message
        self.gate = anyio.Event()
        self.blocked = anyio.Event()
        self.cancelled = anyio.Event()


def make_registry(probe: Probe) -> Registry:
    registry = Registry()

    @registry.define("p", max_attempts=1, state={"notes": collection(Note, primary_key="key")})
    async def p(ctx: HandlerContext, wake: WakeEvent) -> None:
        notes = ctx.state["notes"]
        for message in wake.messages:
            do = message.payload
            probe.notes_seen.append(len(notes))
            if do == "fail":
                raise RuntimeError("this message fails its wake")
            if do == "setup":  # a bit of everything that leaves rows behind
                ctx.set_tag("team", "blue")
                ctx.schedule_cron("hourly", "0 * * * *")
                await ctx.send(ctx.entity_url, "later", after_ms=3_600_000)
                await ctx.observe(entity(WATCHED))
                await ctx.spawn("p", KID.rsplit("/", 1)[1], initial_message="spawn-grandkid")
            if do == "spawn-grandkid":
                await ctx.spawn("p", GRANDKID.rsplit("/", 1)[1])
            if do == "block":
                probe.blocked.set()
                try:
                    await probe.gate.wait()
                except anyio.get_cancelled_exc_class():
                    probe.cancelled.set()
                    raise
            notes.upsert(Note(key=message.key, text=str(do)))
            ctx.reply(len(notes), to=message)

    @registry.define("w")
    async def w(ctx: HandlerContext, wake: WakeEvent) -> None:
        await ctx.observe(entity(ROOT))

    return registry


async def all_rows(store_url: str) -> list[tuple[str, str, bytes]]:
    """Every side-table row of the store: (namespace, key, value)."""
    if store_url.startswith("sqlite:"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            return list(db.execute("SELECT namespace, key, value FROM kv ORDER BY namespace, key"))
    import asyncpg

    from streams._backends._postgres_schema import parse_url, quote_ident

    parsed = parse_url(store_url)
    pg = await asyncpg.connect(parsed.dsn)
    try:
        rows = await pg.fetch(
            f"SELECT namespace, key, value FROM {quote_ident(parsed.schema)}.kv "
            'ORDER BY namespace COLLATE "C", key COLLATE "C"'
        )
    finally:
        await pg.close()
    return [(r["namespace"], r["key"], bytes(r["value"])) for r in rows]


async def stream_paths(store_url: str) -> set[str]:
    """Every stream path the store holds (soft-deleted ones too), and ``#orphans`` if any
    message row belongs to no stream."""
    if store_url.startswith("sqlite:"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            paths = {r[0] for r in db.execute("SELECT path FROM streams")}
            stray = db.execute(
                "SELECT count(*) FROM messages WHERE stream_id NOT IN (SELECT id FROM streams)"
            ).fetchone()[0]
    else:
        import asyncpg

        from streams._backends._postgres_schema import parse_url, quote_ident

        parsed = parse_url(store_url)
        schema = quote_ident(parsed.schema)
        pg = await asyncpg.connect(parsed.dsn)
        try:
            paths = {r["path"] for r in await pg.fetch(f"SELECT path FROM {schema}.streams")}
            stray = await pg.fetchval(
                f"SELECT count(*) FROM {schema}.messages "
                f"WHERE stream_id NOT IN (SELECT id FROM {schema}.streams)"
            )
        finally:
            await pg.close()
    return paths | ({"#orphans"} if stray else set())


def mentions(rows: list[tuple[str, str, bytes]], *urls: str) -> list[tuple[str, str]]:
    """The rows whose key or value names one of ``urls`` (as a URL or its stream path)."""
    needles = [u for url in urls for u in (f'"{url}"', f"{url}|", f"|{url}", f"{url}\n")]
    needles += [f"{url[1:]}/main" for url in urls]
    found = []
    for namespace, key, value in rows:
        text = f"{key}|\n{value.decode('latin-1')}"
        if key in urls or any(n in text for n in needles):
            found.append((namespace, key))
    return found


@pytest.fixture
async def world(shared_store_url: str) -> AsyncIterator[tuple[Runtime, Probe]]:
    probe = Probe()
    async with Runtime(make_registry(probe), shared_store_url, snapshot_every=3) as rt:
        yield rt, probe


async def build(rt: Runtime) -> None:
    """``/p/root`` with state, tags, a cron schedule, a delayed send, an observation (both
    ways), a child and a grandchild, a dead letter, idempotency keys, a snapshot, a queued
    message, and a streams subscription linking its stream."""
    await rt.spawn(WATCHED)
    await rt.spawn(ROOT, idempotency_key="spawn-key")
    await rt.send(ROOT, "setup", idempotency_key="send-key")
    await rt.run_until_idle()
    await rt.spawn(WATCHER)
    await rt.send(ROOT, "fail")
    await rt.run_until_idle()
    for n in range(4):
        await rt.send(ROOT, f"note {n}")
        await rt.run_until_idle()
    await rt.send(ROOT, "queued")  # left pending
    subscription = {
        "id": "sub1",
        "links": {"p/root/main": ["pattern", 3], "p/seen/main": ["pattern", 1]},
    }
    await rt.store.commit([KvPut(SUBSCRIPTIONS_NS, "sub1", orjson.dumps(subscription))])


async def test_purge_removes_the_stream_and_every_row(
    world: tuple[Runtime, Probe], shared_store_url: str
) -> None:
    rt, _probe = world
    await build(rt)
    before = await all_rows(shared_store_url)
    namespaces = {ns for ns, _key in mentions(before, ROOT)}
    # the set-up left rows of every kind behind (else this test would prove little)
    assert {
        "entity", "pending", "entity-snapshot", "tag", "dead", "timer", "schedule",
        "observer", "idempotency", "idempotency_expiry", SUBSCRIPTIONS_NS,
    } <= namespaces, namespaces  # fmt: skip
    assert (await rt.get(KID)).parent == ROOT

    assert await rt.purge(ROOT) == [ROOT]

    after = await all_rows(shared_store_url)
    # only the kept entities' own rows still name it: the child's record (its parent), and
    # the snapshots of the views of the child and of the watcher (their own history)
    assert mentions(after, ROOT) == [
        ("entity", KID),
        ("entity-snapshot", KID),
        ("entity-snapshot", WATCHER),
    ]
    assert "p/root/main" not in await stream_paths(shared_store_url)
    assert "#orphans" not in await stream_paths(shared_store_url)
    subscription = orjson.loads(next(v for ns, k, v in after if ns == SUBSCRIPTIONS_NS))
    assert subscription["links"] == {"p/seen/main": ["pattern", 1]}
    with pytest.raises(EntityNotFound):
        await rt.get(ROOT)
    assert {i.url for i in await rt.list_entities()} == {KID, GRANDKID, WATCHED, WATCHER}
    # the others are untouched and go on: the kid's next run wakes no parent
    await rt.send(KID, "after the purge")
    await rt.send(WATCHED, "changed")
    await rt.run_until_idle()
    assert (await rt.get(KID)).status == "idle"
    with pytest.raises(EntityNotFound):
        await rt.purge(ROOT)


async def test_the_url_is_free_and_a_new_entity_sees_nothing_of_the_old(
    world: tuple[Runtime, Probe], shared_store_url: str
) -> None:
    rt, probe = world
    await build(rt)
    await rt.purge(ROOT)

    # another worker (a fresh cache) runs the new entity's first wake, with many events, so
    # that its acknowledged offset passes where this worker's cached view of the old one ends
    again = await rt.spawn(ROOT, idempotency_key="spawn-key")  # the key is forgotten too
    assert again.runs == 0 and again.tags == {} and again.dead_letters == 0
    for n in range(NEW):
        await rt.send(ROOT, f"new {n}", idempotency_key=f"send-key-{n}")
    other = Runtime(rt.registry, rt.store)
    await other.run_until_idle()
    probe.notes_seen.clear()
    await rt.send(ROOT, "one more", idempotency_key="send-key")
    await rt.run_until_idle()  # this worker once cached the old entity's view
    assert probe.notes_seen == [NEW]  # the new entity's notes, none of the old one's

    inspected = await rt.inspect(ROOT)
    assert len(inspected["state"]["notes"]) == NEW + 1
    assert inspected["manifest"] == {} and inspected["tags"] == {}
    assert await rt.schedules(ROOT) == []
    assert await rt.dead_letters(url=ROOT) == []
    events, _ = await rt.read(ROOT)
    assert not [e for e in events if e["type"] == "inbox" and e["value"]["payload"] == "setup"]
    # the old entity's timers are gone: an hour on, no cron tick or delayed send arrives
    assert not [k for ns, k, _v in await all_rows(shared_store_url) if ns == "timer"]
    # the kept child finishing wakes nobody: the entity now at its parent's URL is younger
    await rt.send(KID, "still here")
    await rt.run_until_idle()
    events, _ = await rt.read(ROOT)
    assert not [e for e in events if e["type"] == "wakes"]


async def test_a_recursive_purge_takes_the_descendants(
    world: tuple[Runtime, Probe], shared_store_url: str
) -> None:
    rt, _probe = world
    await build(rt)
    assert await rt.purge(ROOT, recursive=True) == [ROOT, KID, GRANDKID]
    rows = await all_rows(shared_store_url)
    assert mentions(rows, ROOT, KID, GRANDKID) == [("entity-snapshot", WATCHER)]  # its view
    paths = await stream_paths(shared_store_url)
    assert not paths & {"p/root/main", "p/kid/main", "p/grandkid/main"}
    assert {i.url for i in await rt.list_entities()} == {WATCHED, WATCHER}


async def test_a_wake_running_at_the_purge_is_fenced(
    world: tuple[Runtime, Probe], shared_store_url: str
) -> None:
    rt, probe = world
    await rt.spawn(ROOT)
    await rt.run_until_idle()
    await rt.send(ROOT, "block")
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(rt.worker(poll_interval=0.05).run, stop)
        with anyio.fail_after(10):
            await probe.blocked.wait()
        assert (await rt.get(ROOT)).status == "running"
        assert await rt.purge(ROOT) == [ROOT]
        with anyio.fail_after(10):  # the worker sees the fence and cancels the handler
            await probe.cancelled.wait()
        probe.gate.set()
        await asyncio.sleep(0.3)  # whatever the wake might still try, it has tried by now
        stop.set()
    assert await rt.lookup(ROOT) is None
    with pytest.raises(StreamNotFound):
        await rt.store.head("p/root/main")
    assert mentions(await all_rows(shared_store_url), ROOT) == []
    await rt.spawn(ROOT)  # free again


async def test_purge_over_http(shared_store_url: str) -> None:
    probe = Probe()
    async with (
        Runtime(make_registry(probe), shared_store_url) as rt,
        serving(create_app(rt)) as base,
        httpx2.AsyncClient(base_url=base) as http,
    ):
        await rt.spawn(ROOT)
        await rt.spawn("/p/other")
        refused = await http.delete("/_entities/entities/p/root", params={"purge": "maybe"})
        assert refused.status_code == 400
        refused = await http.delete("/_entities/entities/p/root", params={"recursive": "true"})
        assert refused.status_code == 400
        killed = await http.delete("/_entities/entities/p/other")  # the default is still kill
        assert killed.status_code == 200 and killed.json()["status"] == "stopped"
        purged = await http.delete("/_entities/entities/p/root", params={"purge": "true"})
        assert purged.status_code == 200 and purged.json() == {"purged": [ROOT]}
        gone = await http.get("/_entities/entities/p/root")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "ENTITY_NOT_FOUND"
        again = await http.delete("/_entities/entities/p/root", params={"purge": "true"})
        assert again.status_code == 404
        assert (await http.put("/_entities/entities/p/root", json={})).status_code == 201


@pytest.mark.parametrize(
    ("query", "action"),
    [
        ("", "kill"),
        ("purge=false", "kill"),
        ("purge=0", "kill"),
        ("purge=true", "admin"),
        ("recursive=true&purge=1", "admin"),
        ("purge=TRUE", "admin"),
        ("purge=maybe", "admin"),  # refused by the route, but only after an admin check
    ],
)
def test_a_purge_needs_admin(query: str, action: str) -> None:
    assert required("DELETE", "/_entities/entities/p/root", query=query) == (action, ROOT)
    assert required("GET", "/_entities/entities/p/root", query=query) == ("read", ROOT)
