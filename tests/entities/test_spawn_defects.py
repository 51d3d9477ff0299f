"""Spawning, fixed where it was wrong: every form of ``wake=`` wakes the parent, replay of an
entity that spawns finds no false divergence, a child id taken by someone else is an error the
parent's handler can handle, the fanout example keeps its jobs apart, and a delayed send to a
stopped entity is marked failed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from entities import (
    DuplicateEntity,
    HandlerContext,
    Registry,
    Runtime,
    VirtualClock,
    Wake,
    WakeEvent,
)
from examples import fanout

registry = Registry()
seen: list[dict[str, Any]] = []


@registry.define("child")
async def child(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        ctx.reply({"echo": message.payload})


@registry.define("parent")
async def parent(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        forms: dict[str, Any] = {
            "string": "run_finished",
            "object": Wake(on="run_finished"),
            "dict": {"on": "run_finished"},
        }
        form = message.payload["form"]
        await ctx.spawn("child", f"{form}", initial_message={"n": 1}, wake=forms[form])
    for event in wake.wakes:
        if event.get("kind") in ("child_finished", "change"):
            seen.append(event)


@registry.define("taker")
async def taker(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        try:
            await ctx.spawn("child", message.payload["id"])
            ctx.reply("spawned", to=message)
        except DuplicateEntity as exc:
            ctx.reply(f"taken: {exc.url}", to=message)


@registry.define("watcher")
async def watcher(ctx: HandlerContext, wake: WakeEvent) -> None:
    if ctx.first_wake:
        await ctx.spawn("child", "watched", wake=Wake(on="change", collections=("texts",)))
    for event in wake.wakes:
        if event.get("kind") == "change":
            seen.append(event)


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    seen.clear()
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        yield runtime


@pytest.mark.parametrize("form", ["string", "object", "dict"])
async def test_every_form_of_run_finished_wakes_the_parent(rt: Runtime, form: str) -> None:
    await rt.spawn("/parent/p")
    await rt.send("/parent/p", {"form": form})
    await rt.run_until_idle()
    finished = [e["finished_child"] for e in seen if e["kind"] == "child_finished"]
    assert [(f["url"], f["run_status"]) for f in finished] == [
        (f"/child/{form}", "completed"),  # its first wake (created, with its message)
    ]
    assert finished[0]["response"] == {"echo": {"n": 1}}


async def test_a_change_condition_observes_the_child(rt: Runtime) -> None:
    await rt.spawn("/watcher/w")
    await rt.run_until_idle()
    await rt.send("/child/watched", {"hello": 1})
    await rt.run_until_idle()
    changes = [c for e in seen for c in e["changes"]]
    assert {(c["collection"], c["kind"]) for c in changes} == {("texts", "insert")}
    manifest = (await rt.view("/watcher/w"))["manifests"]["child:/child/watched"]
    assert manifest["wake"]["on"] == "change"


async def test_a_child_id_taken_by_someone_else_is_an_error_the_handler_sees(
    rt: Runtime,
) -> None:
    await rt.spawn("/taker/t")
    await rt.spawn("/child/mine")  # another client took the id first
    receipt = await rt.send("/taker/t", {"id": "mine"})
    free = await rt.send("/taker/t", {"id": "free"})
    await rt.run_until_idle()
    assert await rt.replies("/taker/t", receipt.key) == ["taken: /child/mine"]
    assert await rt.replies("/taker/t", free.key) == ["spawned"]
    assert (await rt.get("/child/mine")).parent is None  # untouched
    assert (await rt.get("/child/free")).parent == "/taker/t"
    assert await rt.dead_letters() == []


async def test_replay_of_an_entity_that_spawns_finds_no_divergence(store_url: str) -> None:
    async with Runtime(fanout.registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/fanout/r")
        await rt.send("/fanout/r", {"n": 3, "delay_ms": 10})
        await rt.advance(1)
        report = await rt.replay("/fanout/r")
        assert report.wakes and report.ok, report.to_json()


async def test_the_fanout_example_answers_each_job_with_its_own_result(store_url: str) -> None:
    async with Runtime(fanout.registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/fanout/f")
        first = await rt.send("/fanout/f", {"n": 3, "delay_ms": 10})
        await rt.advance(1)
        second = await rt.send("/fanout/f", {"n": 2, "delay_ms": 10})
        await rt.advance(1)
        assert await rt.replies("/fanout/f", first.key) == [14]
        assert await rt.replies("/fanout/f", second.key) == [5]


async def test_a_fanout_whose_child_ids_are_taken_answers_with_an_error(store_url: str) -> None:
    async with Runtime(fanout.registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/fanout/g")
        await rt.spawn("/square/g-1-2", args={"x": 9})  # someone got there first
        job = await rt.send("/fanout/g", {"n": 3, "delay_ms": 10})
        await rt.advance(1)
        [answer] = await rt.replies("/fanout/g", job.key)
        assert answer == {"error": "entity /square/g-1-2 already exists"}
        later = await rt.send("/fanout/g", {"n": 2, "delay_ms": 10})
        await rt.advance(1)
        assert await rt.replies("/fanout/g", later.key) == [5]  # not wedged


sender = Registry()


@sender.define("scheduler")
async def scheduler(ctx: HandlerContext, wake: WakeEvent) -> None:
    if ctx.first_wake:
        await ctx.send("/child/gone", {"later": True}, after_ms=1000)


@sender.define("child")
async def sink(ctx: HandlerContext, wake: WakeEvent) -> None:
    return None


async def test_a_delayed_send_to_a_stopped_entity_is_marked_failed(store_url: str) -> None:
    async with Runtime(sender, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/child/gone")
        await rt.spawn("/scheduler/s")
        await rt.run_until_idle()
        await rt.kill("/child/gone")
        await rt.advance(2)
        [entry] = await rt.schedules("/scheduler/s")
        assert entry["status"] == "failed"
        assert entry["reason"] == "the target /child/gone is stopped"
