"""Orphans: an entity whose type the running code lacks is ``orphaned``, keeps its data and its
queued wakes, refuses new sends and spawns with ``UNKNOWN_ENTITY_TYPE``, makes no worker raise
or record a failure, and resumes when its type returns (timers firing meanwhile are kept).

Each test stops one runtime and opens another over the same store with another registry, as a
deploy does (SQLite and PostgreSQL: a store that two runtimes share).
"""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
from pydantic import BaseModel

from entities import (
    EntityNotFound,
    HandlerContext,
    Registry,
    Runtime,
    UnknownEntityType,
    VirtualClock,
    WakeEvent,
    collection,
    entity,
)
from entities.server import create_app
from tests._live import serving


class Note(BaseModel):
    key: str
    text: str


def registry_of(*names: str, seen: list[tuple[str, Any]] | None = None) -> Registry:
    """Types ``names``: each records the messages it gets in its ``notes`` collection (and in
    ``seen``); a message ``{"later": ms}`` makes it send itself ``"tick"`` that much later."""
    registry = Registry()
    for name in names:

        async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
            notes = ctx.state["notes"]
            for message in wake.messages:
                payload = message.payload
                if seen is not None:
                    seen.append((ctx.entity_url, payload))
                notes.insert(Note(key=message.key, text=str(payload)))
                if isinstance(payload, dict) and "later" in payload:
                    await ctx.send(ctx.entity_url, "tick", after_ms=payload["later"])
                ctx.reply("ok", to=message)

        registry.define(name, state={"notes": collection(Note, primary_key="key")})(handler)
    return registry


async def crash_mid_wake(rt: Runtime, url: str) -> None:
    """Claim ``url``'s wake as a worker would, and never finish it (the process died)."""
    claim = await rt.worker().claim(url)
    assert claim is not None


async def test_a_removed_type_leaves_its_entities_orphaned(shared_store_url: str) -> None:
    clock = VirtualClock()
    async with Runtime(registry_of("a", "b"), shared_store_url, clock=clock) as old:
        await old.spawn("/b/1", initial_message="first")
        await old.spawn("/b/2")
        await old.run_until_idle()
        await old.send("/b/1", "queued")
        await old.send("/b/2", "in flight")
        await crash_mid_wake(old, "/b/2")  # the old code's worker died mid-wake
        assert (await old.get("/b/2")).status == "running"
    clock.set(clock.now() + 120)  # the dead worker's lease is long gone

    async with Runtime(registry_of("a"), shared_store_url, clock=clock) as new:
        # on main this left /b/2 ``running`` (with nothing recorded) and inspect raised
        for url in ("/b/1", "/b/2"):
            info = await new.get(url)
            assert info.status == "orphaned" and info.pending, info
        assert [i.url for i in await new.list_entities(status="orphaned")] == ["/b/1", "/b/2"]
        assert await new.list_entities(status="running") == []
        inspected = await new.inspect("/b/1")
        assert inspected["status"] == "orphaned"
        assert [n["text"] for n in inspected["state"]["notes"].values()] == ["first"]
        assert await new.run_until_idle() == 0  # skipped, not raised
        with pytest.raises(UnknownEntityType):
            await new.send("/b/1", "refused")
        with pytest.raises(UnknownEntityType):
            await new.spawn("/b/3")
        await new.spawn("/a/1")  # the types it has run as usual
        await new.send("/a/1", "hello")
        assert await new.run_until_idle() == 1  # spawn and message: one wake
        assert (await new.get("/a/1")).runs == 1
        # nothing was recorded as failed, nothing dead-lettered
        assert await new.dead_letters() == []
        for url in ("/b/1", "/b/2"):
            events, _ = await new.read(url)
            statuses = [e["value"]["status"] for e in events if e["type"] == "runs"]
            assert statuses == ["completed"]  # the first wake, under the old code
            assert not [e for e in events if e["type"] == "errors"]
        with pytest.raises(EntityNotFound):
            await new.get("/b/3")

    seen: list[tuple[str, Any]] = []
    async with Runtime(registry_of("a", "b", seen=seen), shared_store_url, clock=clock) as back:
        assert (await back.get("/b/1")).status == "idle"
        assert await back.run_until_idle() >= 2  # both queued wakes run now
        assert sorted(seen) == [("/b/1", "queued"), ("/b/2", "in flight")]
        for url in ("/b/1", "/b/2"):
            info = await back.get(url)
            assert info.status == "idle" and not info.pending
        assert await back.list_entities(status="orphaned") == []


async def test_timers_of_an_orphan_are_kept_and_fire_when_its_type_returns(
    shared_store_url: str,
) -> None:
    clock = VirtualClock()
    async with Runtime(registry_of("b"), shared_store_url, clock=clock) as old:
        await old.spawn("/b/1")
        await old.send("/b/1", {"later": 60_000})
        await old.run_until_idle()
    seen: list[tuple[str, Any]] = []
    async with Runtime(registry_of("a"), shared_store_url, clock=clock) as new:
        assert await new.advance(120) == 0  # the timer fires: its message is appended
        events, _ = await new.read("/b/1")
        assert [e["value"]["payload"] for e in events if e["type"] == "inbox"][-1] == "tick"
        assert await new.store.kv_scan("timer") == []
        info = await new.get("/b/1")
        assert info.status == "orphaned" and info.pending and info.queue == 1
    async with Runtime(registry_of("b", seen=seen), shared_store_url, clock=clock) as back:
        assert await back.run_until_idle() == 1
        assert seen == [("/b/1", "tick")]


async def test_orphans_over_http(shared_store_url: str) -> None:
    async with Runtime(registry_of("a", "b"), shared_store_url) as old:
        await old.spawn("/b/1")
        await old.run_until_idle()
    async with (
        Runtime(registry_of("a"), shared_store_url) as new,
        serving(create_app(new)) as base,
        httpx2.AsyncClient(base_url=base) as http,
    ):
        listed = await http.get("/_entities/entities", params={"status": "orphaned"})
        assert [e["url"] for e in listed.json()] == ["/b/1"]
        inspected = await http.get("/_entities/entities/b/1")
        assert inspected.status_code == 200 and inspected.json()["status"] == "orphaned"
        sent = await http.post("/_entities/entities/b/1/send", json={"payload": "x"})
        assert sent.status_code == 404 and sent.json()["error"]["code"] == "UNKNOWN_ENTITY_TYPE"
        spawned = await http.put("/_entities/entities/b/2", json={})
        assert spawned.status_code == 404
        assert spawned.json()["error"]["code"] == "UNKNOWN_ENTITY_TYPE"
        killed = await http.delete("/_entities/entities/b/1")  # an orphan can still be killed
        assert killed.status_code == 200 and killed.json()["status"] == "stopped"


def watcher_registry(woken: list[str] | None = None) -> Registry:
    """``a`` (as above) and ``w``, which observes ``/a/1`` and records the wakes it gets."""
    registry = registry_of("a")

    @registry.define("w")
    async def w(ctx: HandlerContext, wake: WakeEvent) -> None:
        await ctx.observe(entity("/a/1"))
        if woken is not None:
            woken.extend(str(w.get("kind")) for w in wake.wakes)

    return registry


async def test_observer_wakes_of_an_orphan_are_kept(shared_store_url: str) -> None:
    async with Runtime(watcher_registry(), shared_store_url) as old:
        await old.spawn("/a/1")
        await old.spawn("/w/1")
        await old.run_until_idle()
    async with Runtime(registry_of("a"), shared_store_url) as new:  # w's code is gone
        await new.send("/a/1", "a change")
        assert await new.run_until_idle() == 1
        info = await new.get("/w/1")
        assert info.status == "orphaned" and info.pending and info.queue == 1
    woken: list[str] = []
    async with Runtime(watcher_registry(woken), shared_store_url) as back:
        assert await back.run_until_idle() == 1
        assert woken == ["change"]  # the change it missed while orphaned
        assert (await back.get("/w/1")).status == "idle"
