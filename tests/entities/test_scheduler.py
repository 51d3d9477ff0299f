"""Delayed sends, cron schedules and child fan-in, driven by a virtual clock, on every store
backend (restarts and two schedulers: on the backends whose stores processes share)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from entities import ContextError, HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities._pipeline.fire import fire_due
from examples import fanout
from streams import open_store


def _inbox(events: list[dict[str, Any]]) -> list[Any]:
    return [e["value"]["payload"] for e in events if e["type"] == "inbox"]


async def test_delayed_send_fires_once_when_due(store_url: str) -> None:
    registry = Registry()
    got: list[tuple[float, Any]] = []

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        for m in wake.messages:
            if m.payload.get("later"):
                got.append((ctx.now(), m.payload))
            else:
                await ctx.send(ctx.entity_url, {"later": True}, after_ms=500)

    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        start = clock.now()
        await rt.spawn("/t/a", initial_message={"go": 1})
        await rt.run_until_idle()
        data = await rt.inspect("/t/a")
        schedules = [m for m in data["manifest"].values() if m["kind"] == "schedule"]
        assert len(schedules) == 1 and schedules[0]["schedule_type"] == "future_send"
        await rt.advance(0.4)
        assert got == []
        await rt.advance(0.2)
        assert got == [(start + 0.5, {"later": True})]
        await rt.advance(10)
        assert len(got) == 1
        events, _ = await rt.read("/t/a")
        assert _inbox(events) == [{"go": 1}, {"later": True}]


async def test_cron_ticks_cancel_and_catch_up_without_burst(store_url: str) -> None:
    registry = Registry()
    ticks: list[dict[str, Any]] = []

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        for m in wake.messages:
            if m.payload.get("start"):
                ctx.schedule_cron("tick", "* * * * *", payload={"p": 1})
            if m.payload.get("stop"):
                assert ctx.cancel_schedule("tick")
            if m.payload.get("bad"):
                with pytest.raises(ContextError):
                    ctx.schedule_cron("bad", "not a cron")
        ticks.extend(w for w in wake.wakes if w.get("kind") == "cron")

    clock = VirtualClock(start=1_700_000_000.0)  # 22:13:20 UTC: next minute is 40 s away
    async with Runtime(registry, store_url, clock=clock) as rt:
        await rt.spawn("/t/a", initial_message={"start": True, "bad": True})
        await rt.run_until_idle()
        await rt.advance(40 + 60 * 2 + 1)  # three minute boundaries
        assert [t["missed"] for t in ticks] == [0, 0, 0]
        assert all(t["payload"] == {"p": 1} and t["late_ms"] == 0 for t in ticks)
        # downtime: time jumps 10 minutes with nobody running; one tick, nine counted missed
        clock.advance(600)
        await rt.run_until_idle()
        assert len(ticks) == 4 and ticks[-1]["missed"] == 9 and ticks[-1]["late_ms"] > 0
        await rt.send("/t/a", {"stop": True})
        await rt.advance(300)
        assert len(ticks) == 4


async def test_cron_survives_a_restart(shared_store_url: str) -> None:
    """The process stops; another opens the same store: the cron fires on."""
    registry = Registry()
    ticks: list[float] = []

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        if ctx.first_wake:
            ctx.schedule_cron("hourly", "0 * * * *", timezone="Europe/Paris")
        ticks.extend(w["due"] for w in wake.wakes if w.get("kind") == "cron")

    clock = VirtualClock(start=1_700_000_000.0)
    async with Runtime(registry, shared_store_url, clock=clock) as rt:
        await rt.spawn("/t/a")
        await rt.run_until_idle()
    clock.advance(3600)  # the process is down for an hour
    async with Runtime(registry, shared_store_url, clock=clock) as rt:
        await rt.run_until_idle()
        assert len(ticks) == 1 and ticks[0] % 3600 == 0
        await rt.advance(3600)
        assert len(ticks) == 2 and ticks[1] - ticks[0] == 3600


async def test_two_schedulers_fire_each_timer_once(shared_store_url: str) -> None:
    """Two stores over one database (as two processes hold) fire the due timers together."""
    registry = Registry()

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        if ctx.first_wake and ctx.entity_id == "src":
            for i in range(200):
                await ctx.send("/t/sink", {"i": i}, after_ms=10 + i % 7)

    clock = VirtualClock()
    async with open_store(shared_store_url) as one, open_store(shared_store_url) as two:
        rt = Runtime(registry, one, clock=clock)
        await rt.spawn("/t/sink")
        await rt.spawn("/t/src")
        await rt.run_until_idle()
        clock.advance(1)
        fired: list[int] = []

        async def scheduler(store: Any) -> None:
            fired.append(await fire_due(store, clock.now()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler, one)
            tg.start_soon(scheduler, two)
        assert sum(fired) == 200
        events, _ = await rt.read("/t/sink")
        payloads = [p["i"] for p in _inbox(events)]
        assert sorted(payloads) == list(range(200))


async def test_fanout_example_sums_squares(store_url: str) -> None:
    async with Runtime(fanout.registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/fanout/f1")
        receipt = await rt.send("/fanout/f1", {"n": 5, "delay_ms": 200})
        await rt.run_until_idle()
        assert await rt.replies("/fanout/f1", receipt.key) == []
        await rt.advance(0.25)
        assert await rt.replies("/fanout/f1", receipt.key) == [55]
        children = await rt.list_entities(parent="/fanout/f1")
        assert len(children) == 5


@pytest.mark.slow
async def test_a_thousand_children_fan_in_exactly_once(store_url: str) -> None:
    n = 1000
    async with Runtime(fanout.registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/fanout/big")
        receipt = await rt.send("/fanout/big", {"n": n, "delay_ms": 50})
        await rt.advance(1)
        assert await rt.replies("/fanout/big", receipt.key) == [sum(i * i for i in range(1, n + 1))]
        events, _ = await rt.read("/fanout/big", limit=1_000_000)
        finished = [
            e["value"]["finished_child"]["url"]
            for e in events
            if e["type"] == "wakes" and e["value"].get("kind") == "child_finished"
        ]
        # each child ran twice (first wake, then the delayed tick): two notices each, no more
        assert len(finished) == 2 * n and len(set(finished)) == n
        state = await rt.state_of("/fanout/big")
        assert len(state["results"]) == n
