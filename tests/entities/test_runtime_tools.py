"""Tools and the runtime's host tools (send, spawn, schedules) driven as an agent would."""

from __future__ import annotations

from typing import Any

from entities import HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities.agent import Tool, ToolResult, tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def test_tool_validates_arguments_and_returns_errors() -> None:
    assert isinstance(add, Tool)
    assert add.description == "Add two integers."
    assert set(add.json_schema()["properties"]) == {"a", "b"}
    ok = await add.call({"a": 2, "b": 3})
    assert ok == ToolResult("add", {"a": 2, "b": 3}, result=5, duration_ms=ok.duration_ms)
    bad = await add.call({"a": "two"})
    assert bad.error is not None and "invalid arguments" in bad.error and "b" in bad.error

    @tool(name="boom")
    async def explode() -> None:
        raise RuntimeError("nope")

    failed = await explode.call({})
    assert failed.error == "RuntimeError: nope"


async def test_runtime_tools_send_spawn_and_schedules(store_url: str) -> None:
    registry = Registry()
    results: dict[str, Any] = {}

    @registry.define("worker")
    async def worker(ctx: HandlerContext, wake: WakeEvent) -> None:
        for m in wake.messages:
            results.setdefault("worker_got", []).append(m.payload)

    @registry.define("boss")
    async def boss(ctx: HandlerContext, wake: WakeEvent) -> None:
        if not ctx.first_wake:
            return
        tools = {t.name: t for t in ctx.runtime_tools}
        assert set(tools) == {
            "send_message",
            "spawn_entity",
            "list_schedules",
            "upsert_cron_schedule",
            "upsert_future_send",
            "delete_schedule",
        }
        results["spawn"] = await tools["spawn_entity"].call({"type": "worker", "id": "w1"})
        results["send"] = await tools["send_message"].call({"url": "/worker/w1", "payload": 1})
        results["later"] = await tools["upsert_future_send"].call(
            {"url": "/worker/w1", "payload": 2, "after_ms": 1000}
        )
        results["cron"] = await tools["upsert_cron_schedule"].call(
            {"id": "daily", "expression": "0 9 * * *"}
        )
        results["bad_cron"] = await tools["upsert_cron_schedule"].call(
            {"id": "x", "expression": "nope"}
        )
        results["list"] = await tools["list_schedules"].call({})
        results["delete"] = await tools["delete_schedule"].call({"id": "daily"})
        results["missing"] = await tools["send_message"].call({"url": "/worker/none", "payload": 0})

    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        await rt.spawn("/boss/b")
        await rt.run_until_idle()
        assert results["spawn"].result == {"spawned": "/worker/w1"}
        assert results["send"].ok and results["later"].ok and results["cron"].ok
        assert results["bad_cron"].error and "invalid cron" in results["bad_cron"].error
        assert {s["id"] for s in results["list"].result} >= {"cron:daily"}
        assert results["delete"].result == {"deleted": True}
        assert results["missing"].error and "EntityNotFound" in results["missing"].error
        assert results["worker_got"] == [1]
        await rt.advance(2)
        assert results["worker_got"] == [1, 2]
