"""Observation: change and run_finished wakes, debounce, timeout, shared state, tag membership."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from entities import (
    EntityNotFound,
    HandlerContext,
    Registry,
    Runtime,
    VirtualClock,
    Wake,
    WakeEvent,
    collection,
    db,
    entities,
    entity,
)


class Row(BaseModel):
    key: str
    value: int = 0


def build(wake: Wake, seen: list[dict[str, Any]], source: Any = None) -> Registry:
    registry = Registry()

    @registry.define("src", state={"rows": collection(Row)})
    async def src(ctx: HandlerContext, w: WakeEvent) -> None:
        for m in w.messages:
            if "set" in m.payload:
                ctx.state.rows.upsert(Row(key=m.payload["set"], value=m.payload.get("v", 0)))
                ctx.reply(m.payload["set"])
            if "tag" in m.payload:
                ctx.set_tag("team", m.payload["tag"])

    @registry.define("watcher")
    async def watcher(ctx: HandlerContext, w: WakeEvent) -> None:
        await ctx.observe(source or entity("/src/s1"), wake=wake)
        seen.extend(x for x in w.wakes if x.get("kind") != "created")

    return registry


async def test_change_wakes_filter_collections_and_ops(store_url: str) -> None:
    seen: list[dict[str, Any]] = []
    registry = build(Wake(on="change", collections=("rows",), ops=("insert",)), seen)
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/src/s1")
        await rt.spawn("/watcher/w")
        await rt.run_until_idle()
        await rt.send("/src/s1", {"set": "a"})
        await rt.run_until_idle()
        await rt.send("/src/s1", {"set": "a", "v": 2})  # an update: filtered out
        await rt.run_until_idle()
        assert [x["changes"] for x in seen] == [
            [{"collection": "rows", "kind": "insert", "key": "a"}]
        ]
        assert seen[0]["source"] == "/src/s1"


async def test_run_finished_observation_carries_the_response(store_url: str) -> None:
    seen: list[dict[str, Any]] = []
    registry = build(Wake(on="run_finished"), seen)
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/src/s1")
        await rt.spawn("/watcher/w")
        await rt.run_until_idle()
        await rt.send("/src/s1", {"set": "b"})
        await rt.run_until_idle()
        assert seen[-1]["kind"] == "run_finished"
        assert seen[-1]["finished"]["response"] == "b"
        assert seen[-1]["finished"]["run_status"] == "completed"


async def test_debounce_coalesces_changes_and_timeout_is_a_heartbeat(store_url: str) -> None:
    seen: list[dict[str, Any]] = []
    registry = build(Wake(on="change", debounce_ms=1000, timeout_ms=5000), seen)
    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        await rt.spawn("/src/s1")
        await rt.spawn("/watcher/w")
        await rt.run_until_idle()
        for key in ("a", "b", "c"):
            await rt.send("/src/s1", {"set": key})
            await rt.advance(0.5)  # changes 0.5 s apart: the debounce keeps moving
        assert seen == []
        await rt.advance(1.0)
        assert len(seen) == 1 and seen[0]["debounced"] is True
        assert [c["key"] for c in seen[0]["changes"] if c["collection"] == "rows"] == [
            "a",
            "b",
            "c",
        ]
        await rt.advance(5.0)  # quiet for timeout_ms: a heartbeat wake
        assert [x["kind"] for x in seen] == ["change", "timeout"]
        await rt.advance(5.0)
        assert [x["kind"] for x in seen] == ["change", "timeout", "timeout"]


async def test_failed_attach_raises_never_empty_state(store_url: str) -> None:
    errors: list[BaseException] = []
    registry = Registry()

    @registry.define("watcher")
    async def watcher(ctx: HandlerContext, w: WakeEvent) -> None:
        for source in (entity("/nobody/here"), db("missing", {"rows": collection(Row)})):
            with pytest.raises(EntityNotFound) as info:
                await ctx.observe(source)
            errors.append(info.value)

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/watcher/w")
        await rt.run_until_idle()
        assert len(errors) == 2


async def test_shared_state_db_is_written_by_one_and_observed_by_another(store_url: str) -> None:
    registry = Registry()
    schema = {"rows": collection(Row)}
    seen: list[dict[str, Any]] = []
    reads: list[list[int]] = []

    @registry.define("owner")
    async def owner(ctx: HandlerContext, w: WakeEvent) -> None:
        if ctx.first_wake:
            shared = await ctx.mkdb("board", schema)
            shared.rows.insert(Row(key="x", value=1))
            return
        shared = await ctx.observe(db("board", schema))
        for m in w.messages:
            shared.rows.update("x", Row(key="x", value=m.payload["v"]))

    @registry.define("reader")
    async def reader(ctx: HandlerContext, w: WakeEvent) -> None:
        shared = await ctx.observe(db("board", schema), wake=Wake(on="change"))
        reads.append([r.value for r in shared.rows.to_list()])
        seen.extend(x for x in w.wakes if x.get("kind") == "change")

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/owner/o")
        await rt.run_until_idle()
        await rt.spawn("/reader/r")
        await rt.run_until_idle()
        await rt.send("/owner/o", {"v": 7})
        await rt.run_until_idle()
        assert reads == [[1], [7]]
        assert seen[0]["source"] == "db:board"


async def test_tag_membership_wakes_on_join_and_leave(store_url: str) -> None:
    seen: list[dict[str, Any]] = []
    registry = build(Wake(on="change"), seen, source=entities(tags={"team": "red"}))
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/src/s1")
        await rt.spawn("/watcher/w")
        await rt.run_until_idle()
        await rt.send("/src/s1", {"tag": "red"})
        await rt.run_until_idle()
        await rt.send("/src/s1", {"tag": "blue"})
        await rt.run_until_idle()
        kinds = [c["kind"] for x in seen for c in x["changes"]]
        assert kinds == ["insert", "delete"]


def _count_scans(rt: Runtime, prefix: str) -> list[str]:
    """Record the observer-row scans of ``prefix`` made through ``rt``'s store."""
    scans: list[str] = []
    original = rt.store.kv_scan

    async def counted(namespace: str, *args: Any, **kwargs: Any) -> Any:
        if namespace == "observer" and args and args[0] == prefix:
            scans.append(prefix)
        return await original(namespace, *args, **kwargs)

    rt.store.kv_scan = counted  # type: ignore[method-assign]
    return scans


async def test_a_worker_reads_an_entitys_observers_once_while_they_stay(store_url: str) -> None:
    """The observers of an entity come from the worker's copy after the first wake (each
    commit checks they are current); a new observer is seen by the next change all the same."""
    seen: list[dict[str, Any]] = []
    registry = build(Wake(on="change", collections=("rows",)), seen)
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        scans = _count_scans(rt, "/src/s1|")
        await rt.spawn("/src/s1")
        for i in range(10):
            await rt.send("/src/s1", {"set": f"k{i}"})
            await rt.run_until_idle()
        assert len(scans) == 1
        await rt.spawn("/watcher/w")  # this worker's own commit: it forgets its copy
        await rt.run_until_idle()
        await rt.send("/src/s1", {"set": "after"})
        await rt.run_until_idle()
        assert [c["key"] for x in seen for c in x["changes"]] == ["after"]
        assert len(scans) == 2


async def test_an_observer_added_by_another_worker_fails_the_stale_copy(store_url: str) -> None:
    """Worker one holds the observers of ``/src/s1`` (none); worker two runs the wake that
    starts observing it. Worker one's next commit of a change finds its copy stale (the
    generation row moved), reads the observers again and wakes the new one."""
    seen: list[dict[str, Any]] = []
    registry = build(Wake(on="change", collections=("rows",)), seen)
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        scans = _count_scans(rt, "/src/s1|")
        one, two = rt.worker(), rt.worker()
        await rt.spawn("/src/s1")
        await rt.send("/src/s1", {"set": "before"})
        await one.run_until_idle()
        assert len(scans) == 1
        await rt.spawn("/watcher/w")
        await two.run_until_idle()  # registers the observation: worker one is not told
        await rt.send("/src/s1", {"set": "after"})
        await one.run_until_idle()
        assert [c["key"] for x in seen for c in x["changes"]] == ["after"]
        assert len(scans) == 2  # the stale copy, then a fresh read
        # and an observer that stops observing is not woken by a stale copy either
        events, _ = await rt.read("/src/s1", limit=1000)
        assert sum(1 for e in events if e["type"] == "inbox") == 2
