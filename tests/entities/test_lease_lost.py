"""A wake whose lease is taken over mid-run: its next write raises ``LeaseLost`` (with the
entity's URL), the wake is cancelled at its next await even if the handler catches the error,
and nothing it buffered is committed; the wake is redelivered to the new owner."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
from pydantic import BaseModel

from entities import (
    HandlerContext,
    LeaseLost,
    Registry,
    Runtime,
    VirtualClock,
    WakeEvent,
    collection,
)
from entities._records import ENTITY_NS, EntityRecord
from streams import KvPut


class Row(BaseModel):
    key: str


registry = Registry()
seen: dict[str, list[Any]] = {"caught": [], "after": [], "calls": []}
holder: dict[str, Runtime] = {}


async def steal(ctx: HandlerContext) -> None:
    """What another worker does when this one's lease expired: claim the entity."""
    rt = holder["rt"]
    raw = await rt.store.kv_get(ENTITY_NS, ctx.entity_url)
    assert raw is not None
    record = EntityRecord.load(raw)
    taken = record.model_copy(
        update={"epoch": record.epoch + 1, "owner": "thief", "lease_expires": rt.clock.now() + 5}
    )
    await rt.store.commit([KvPut(ENTITY_NS, ctx.entity_url, taken.dump())])


@registry.define("slow", state={"rows": collection(Row)})
async def slow(ctx: HandlerContext, wake: WakeEvent) -> None:
    first = await ctx.step("one", lambda: len(seen["calls"]))
    seen["calls"].append(first)
    ctx.state.rows.upsert(Row(key=f"attempt{wake.attempt}"))
    if wake.attempt == 1:
        await steal(ctx)
        try:
            await ctx.step("two", lambda: "never recorded")
        except LeaseLost as exc:
            seen["caught"].append(exc)
            await anyio.lowlevel.checkpoint()  # cancelled here: the wake is over
            seen["after"].append("ran on")
    ctx.reply("done")


async def test_a_fenced_write_raises_lease_lost_and_cancels_the_wake() -> None:
    for values in seen.values():
        values.clear()
    async with Runtime(registry, clock=VirtualClock()) as rt:
        holder["rt"] = rt
        await rt.spawn("/slow/a")
        receipt = await rt.send("/slow/a", {"go": 1})
        await rt.run_until_idle()
        assert [type(e) for e in seen["caught"]] == [LeaseLost]
        assert seen["caught"][0].url == "/slow/a" and seen["caught"][0].code == "LEASE_LOST"
        assert seen["after"] == []  # the handler caught the error, but could not go on
        # redelivered once the thief's lease lapsed: the journaled step is reused
        assert seen["calls"] == [0, 0]
        state = await rt.state_of("/slow/a")
        assert sorted(state["rows"]) == ["attempt2"]  # the fenced attempt's write is gone
        view = await rt.view("/slow/a")
        runs = [r for r in view["runs"].values() if r.get("status") == "completed"]
        assert len(runs) == 1 and runs[0]["attempt"] == 2
        assert await rt.replies("/slow/a", receipt.key) == ["done"]


killer = Registry()
live: list[str] = []


@killer.define("doomed")
async def doomed(ctx: HandlerContext, wake: WakeEvent) -> None:
    await holder["rt"].kill(ctx.entity_url)
    try:
        await ctx.append_live("text_deltas", "d1", {"delta": "x"})
    except LeaseLost:
        live.append("lost")
        raise
    live.append("written")


async def test_a_killed_entity_fences_live_output() -> None:
    live.clear()
    async with Runtime(killer, clock=VirtualClock()) as rt:
        holder["rt"] = rt
        await rt.spawn("/doomed/a")
        await rt.run_until_idle()
        # cancelled by the kill, or stopped by its fenced write: never past it
        assert "written" not in live
        info = await rt.get("/doomed/a")
        assert info.status == "stopped" and info.runs == 0
        events, _ = await rt.read("/doomed/a")
        assert [e["type"] for e in events] == [
            "entity_created",
            "signals",
            "runs",
            "entity_stopped",
        ]
        assert events[2]["value"]["status"] == "cancelled"
