"""Delayed sends in real time: a running Worker with the SystemClock, on every store backend."""

from __future__ import annotations

import time
from typing import Any

import anyio

from entities import HandlerContext, Registry, Runtime, WakeEvent

registry = Registry()
arrivals: list[tuple[str, float]] = []
arrived: list[anyio.Event] = []  # set on the first arrival


@registry.define("delayer", description="schedules a delayed send to the catcher")
async def delayer(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        await ctx.send("/catcher/c", {"tag": message.payload["tag"]}, after_ms=300)


@registry.define("catcher", description="records when each message reaches the handler")
async def catcher(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        arrivals.append((message.payload["tag"], time.time()))
        for event in arrived:
            event.set()


async def test_delayed_send_arrives_after_its_delay_once(store_url: str) -> None:
    arrivals.clear()
    arrived[:] = [anyio.Event()]
    async with Runtime(registry, store_url) as rt:
        await rt.spawn("/catcher/c")
        await rt.spawn("/delayer/d")
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.worker().run, stop)
            sent_at = time.time()
            await rt.send("/delayer/d", {"tag": "t1"})
            with anyio.fail_after(5):
                await arrived[0].wait()
            await anyio.sleep(1.0)  # a duplicate delivery would show up by now
            stop.set()

        assert [tag for tag, _ in arrivals] == ["t1"]
        delay = arrivals[0][1] - sent_at
        assert 0.3 <= delay < 2.0, delay

        # the durable record agrees: one inbox message, delivered no earlier than its due time
        events, _ = await rt.read("/catcher/c", "-1")
        inbox: list[dict[str, Any]] = [e["value"] for e in events if e["type"] == "inbox"]
        assert len(inbox) == 1
        assert inbox[0]["payload"] == {"tag": "t1"} and inbox[0]["from"] == "/delayer/d"
        assert inbox[0]["ts"] >= inbox[0]["due"] >= sent_at + 0.3
        assert await rt.store.kv_scan("timer") == []  # the timer is gone once fired
        # the sender's schedule entry went from pending to sent, with when and how late
        entries = list((await rt.view("/delayer/d"))["manifests"].values())
        assert [e["status"] for e in entries] == ["sent"]
        assert entries[0]["sent_at"] >= entries[0]["fire_at"] and entries[0]["late_ms"] >= 0
        assert entries[0]["target_url"] == "/catcher/c" and entries[0]["payload"] == {"tag": "t1"}
        schedules = await rt.schedules("/delayer/d")
        assert [s["status"] for s in schedules] == ["sent"]
