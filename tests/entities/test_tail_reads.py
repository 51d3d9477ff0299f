"""Reads that follow recent work, not history, on every backend: the replies and outcome of a
message (the reply index plus the unacknowledged tail), ``inspect`` and ``state_of`` (snapshot
plus tail), and ``timeline_messages`` (read backwards). Each answer is compared with the full
scan of the whole stream it replaces, and a wrapped store records the offsets read, to show
that nothing was read from the start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from entities import HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities import collection as coll
from entities._pipeline.load import events_between
from entities._records import REPLY_NS, SNAPSHOT_NS, Outcome
from entities._replies import index_replies
from entities._urls import parse_url
from entities.agent._window import timeline
from streams import KvPut, ReadResult, Store, format_offset, open_store


class Total(BaseModel):
    key: str
    value: int = 0


registry = Registry()


@registry.define("counter", state={"totals": coll(Total)}, max_attempts=1)
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        payload = message.payload or {}
        if payload.get("fail"):
            raise RuntimeError("poison")
        if payload.get("silent"):
            continue
        total = ctx.state.totals.get("total") or Total(key="total")
        ctx.state.totals.upsert(Total(key="total", value=total.value + payload.get("add", 1)))
        ctx.reply(payload.get("add", 1), to=message)
        if payload.get("twice"):
            ctx.reply("again", to=message)


class Reads:
    """The offsets read from each stream through ``store`` since :meth:`reset`."""

    def __init__(self, store: Store) -> None:
        self.forward: list[str] = []
        self.backward: list[str] = []
        read, read_before = store.read, store.read_before

        self.inner = False  # a read made by read_before itself

        async def counted_read(path: str, offset: str = "-1", **kw: Any) -> ReadResult:
            if not self.inner:
                self.forward.append(offset)
            return await read(path, offset, **kw)

        async def counted_before(path: str, offset: str = "now", **kw: Any) -> Any:
            self.backward.append(offset)
            self.inner = True
            try:
                return await read_before(path, offset, **kw)
            finally:
                self.inner = False

        store.read = counted_read  # type: ignore[method-assign]
        store.read_before = counted_before  # type: ignore[method-assign]

    def reset(self) -> None:
        self.forward.clear()
        self.backward.clear()


@asynccontextmanager
async def runtime(store_url: str, reg: Registry = registry) -> AsyncIterator[tuple[Runtime, Reads]]:
    async with open_store(store_url) as store:
        reads = Reads(store)
        async with Runtime(reg, store, clock=VirtualClock(), snapshot_every=20) as rt:
            yield rt, reads


async def full_scan(rt: Runtime, url: str, key: str, after: str = "-1") -> Outcome:
    """The outcome as found before the reply index: every event from ``after`` on."""
    found = Outcome()
    at = None if after == "-1" else after
    offset = after
    while True:
        batch, offset = await rt.read(url, offset, limit=5000)
        for item in batch:
            value = item.get("value")
            if not isinstance(value, dict):
                continue
            if item["type"] == "texts" and value.get("in_reply_to") == key:
                found.replies.append(value.get("value"))
            elif item["type"] == "inbox" and item["key"] == key:
                at = item["offset"]
            elif item["type"] == "runs" and at is not None:
                low, high = value.get("from_offset"), value.get("to_offset")
                if isinstance(low, str) and isinstance(high, str) and low < at <= high:
                    found.status, found.error = value["status"], value.get("error")
        if len(batch) < 5000:
            return found


async def test_outcomes_come_from_the_index_and_the_tail(store_url: str) -> None:
    async with runtime(store_url) as (rt, reads):
        await rt.spawn("/counter/c")
        first = await rt.send("/counter/c", {"add": 5, "twice": True})
        await rt.run_until_idle()
        receipts = [first]
        for n in range(60):
            receipts.append(await rt.send("/counter/c", {"add": n}))
            if n % 3 == 0:
                await rt.run_until_idle()
        silent = await rt.send("/counter/c", {"silent": True})
        await rt.run_until_idle()
        poison = await rt.send("/counter/c", {"fail": True})
        await rt.run_until_idle()
        waiting = await rt.send("/counter/c", {"add": 1})  # not run yet
        assert await rt.store.kv_get(SNAPSHOT_NS, "/counter/c") is not None
        record = (await rt.get("/counter/c")).acked
        for receipt in [*receipts, silent, poison, waiting]:
            reads.reset()
            got = await rt.outcome("/counter/c", receipt.key)
            assert all(offset >= record for offset in reads.forward), reads.forward
            expected = await full_scan(rt, "/counter/c", receipt.key)
            if receipt is silent:  # taken, no reply: without its offset, unknown -> pending
                assert got == Outcome([], "pending") and expected.status == "completed"
            else:
                assert got == expected, receipt
            with_offset = await rt.outcome("/counter/c", receipt.key, after=receipt.offset)
            assert with_offset == await full_scan(rt, "/counter/c", receipt.key, receipt.offset)
        assert (await rt.outcome("/counter/c", first.key)).replies == [5, "again"]
        assert (await rt.outcome("/counter/c", poison.key)).status == "dead_lettered"
        assert (await rt.outcome("/counter/c", waiting.key)).status == "pending"
        assert (await rt.outcome("/counter/c", "nokey")) == Outcome([], "pending")
        # the dead letter retried: its message is pending again, then dead-lettered again
        (letter,) = await rt.dead_letters(url="/counter/c")
        await rt.retry_dead_letter(letter.id)
        assert (await rt.outcome("/counter/c", poison.key)).status == "pending"
        await rt.run_until_idle()
        again = await rt.outcome("/counter/c", poison.key)
        assert again == await full_scan(rt, "/counter/c", poison.key)
        assert again.status == "dead_lettered" and again.error == "RuntimeError: poison"
        # an entity from before the index: the migration writes the rows its commits wrote
        rows = await rt.store.kv_scan(REPLY_NS, "/counter/c\n")
        assert len(rows) > 60
        await rt.store.commit([KvPut(REPLY_NS, key, None) for key, _ in rows])
        assert (await rt.outcome("/counter/c", first.key)).replies == []
        await index_replies(rt.store, parse_url("/counter/c"))
        assert await rt.store.kv_scan(REPLY_NS, "/counter/c\n") == rows
        await index_replies(rt.store, parse_url("/counter/c"))  # again: nothing changes
        assert await rt.store.kv_scan(REPLY_NS, "/counter/c\n") == rows
        assert (await rt.outcome("/counter/c", first.key)).replies == [5, "again"]


async def test_replies_of_a_wake_before_a_snapshot_need_no_early_event(store_url: str) -> None:
    async with runtime(store_url) as (rt, reads):
        await rt.spawn("/counter/c")
        early = await rt.send("/counter/c", {"add": 7})
        await rt.run_until_idle()
        for n in range(100):
            await rt.send("/counter/c", {"add": n})
            await rt.run_until_idle()
        saved = await rt.store.kv_get(SNAPSHOT_NS, "/counter/c")
        assert saved is not None and orjson.loads(saved)["offset"] > early.offset
        # with the worker's view cache warm all along, snapshots still kept up (every 20)
        tail = (await rt.store.head("counter/c/main")).next_offset
        assert events_between(orjson.loads(saved)["offset"], tail) <= 20 + 10
        reads.reset()
        found = await rt.outcome("/counter/c", early.key)
        assert found == Outcome([7], "completed")
        # nothing at or before the early wake's events was read
        assert reads.forward and all(o > format_offset(20) for o in reads.forward)
        assert await rt.replies("/counter/c", early.key, after=early.offset) == [7]


async def test_inspect_and_state_equal_the_full_fold(store_url: str) -> None:
    async with runtime(store_url) as (rt, reads):
        await rt.spawn("/counter/c", args={"a": 1}, tags={"team": "x"})
        for n in range(150):
            await rt.send("/counter/c", {"add": n})
            if n % 7 != 3:
                await rt.run_until_idle()
        await rt.run_until_idle()
        await rt.send("/counter/c", {"add": 1000})  # in the tail, not yet run
        full = await rt.view("/counter/c")
        saved = await rt.store.kv_get(SNAPSHOT_NS, "/counter/c")
        assert saved is not None
        since = orjson.loads(saved)["offset"]
        reads.reset()
        inspected = await rt.inspect("/counter/c")
        assert all(o >= since for o in reads.forward), reads.forward
        assert "-1" not in reads.forward and "-1" not in reads.backward
        assert inspected["args"] == full["entity_created"]["entity"]["args"]
        assert inspected["manifest"] == full.get("manifests", {})
        assert inspected["recent_runs"] == list(full["runs"].values())[-20:]
        assert inspected["state"]["totals"] == full["state:totals"]
        assert inspected["state"]["totals"]["total"]["value"] == sum(range(150))
        assert await rt.state_of("/counter/c") == inspected["state"]
        view = await rt.current_view("/counter/c")
        assert view == {k: v for k, v in full.items() if k in view}
        assert set(view) >= {"entity_created", "state:totals", "tags"}


async def test_inspect_of_a_young_entity_reads_its_whole_short_stream(store_url: str) -> None:
    async with runtime(store_url) as (rt, _reads):
        await rt.spawn("/counter/y")
        await rt.run_until_idle()
        inspected = await rt.inspect("/counter/y")
        full = await rt.view("/counter/y")
        assert inspected["recent_runs"] == list(full["runs"].values())
        assert inspected["state"] == {"totals": {}}


timeline_registry = Registry()
windows: list[tuple[Any, list[Any], list[Any]]] = []
ASKS: list[tuple[str | None, int | None]] = []


@timeline_registry.define("chat")
async def chat(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        text = (message.payload or {}).get("text", "")
        if text.startswith("tools"):
            for round_ in range(2):
                for call in range(3):
                    ctx._emit(
                        "tool_calls",
                        f"{ctx.run_id}.{round_}.{call}",
                        {"call_id": f"{message.key}.{round_}.{call}", "name": "t",
                         "arguments": {}, "result": call, "run_id": ctx.run_id,
                         "round": round_},
                        "insert",
                    )  # fmt: skip
        if not text.startswith("quiet"):
            ctx.reply(f"echo {text}", to=message)
    if (wake.messages[-1].payload or {}).get("check"):
        own = [e for e in ctx.effects.own if e["type"] in ("texts", "tool_calls")]
        events: list[dict[str, Any]] = []
        offset = "-1"
        while True:
            batch, offset = await rt_of(ctx).read(ctx.entity_url, offset, limit=1000)
            events.extend(e for e in batch if e["type"] in ("inbox", "texts", "tool_calls"))
            if len(batch) < 1000:
                break
        for since, last in ASKS:
            expected = timeline([*events, *own], since=since, last=last)
            got = await ctx.timeline_messages(since=since, last=last)
            windows.append(((since, last), got, expected))


def rt_of(ctx: HandlerContext) -> Any:
    return ctx._host


async def test_timeline_messages_equal_the_full_scan(store_url: str) -> None:
    windows.clear()
    async with runtime(store_url, timeline_registry) as (rt, reads):
        await rt.spawn("/chat/a")
        for n in range(140):
            text = "tools" if n % 5 == 0 else "quiet" if n % 11 == 0 else f"m{n}"
            await rt.send("/chat/a", {"text": text})
            if n % 4 == 0:
                await rt.run_until_idle()
        await rt.run_until_idle()
        events, _ = await rt.read("/chat/a")
        middle = events[len(events) // 2]["offset"]
        late = events[-30]["offset"]
        ASKS[:] = [(None, 1), (None, 2), (None, 5), (None, 20), (None, 60), (None, 10_000),
                   (None, 0), (middle, None), (middle, 10), (late, 3), (late, 100),
                   (None, None)]  # fmt: skip
        reads.reset()
        await rt.send("/chat/a", {"text": "tools", "check": True})
        await rt.run_until_idle()
    assert len(windows) == len(ASKS)
    for ask, got, expected in windows:
        assert got == expected, ask
    assert any(len(got) > 15 for ask, got, _ in windows if ask == (None, 20))
    assert reads.backward and "-1" not in reads.backward


async def test_timeline_last_reads_only_the_tail(store_url: str) -> None:
    reg = Registry()
    offsets: list[str] = []

    @reg.define("chat")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        for message in wake.messages:
            ctx.reply("ok", to=message)
        if (wake.messages[-1].payload or {}).get("check"):
            offsets.clear()
            got = await ctx.timeline_messages(last=4)
            assert [m.role for m in got] == ["user", "assistant"] * 2
            offsets.append("done")

    async with runtime(store_url, reg) as (rt, reads):
        await rt.spawn("/chat/b")
        for n in range(250):
            await rt.send("/chat/b", {"n": n})
            await rt.run_until_idle()
        reads.reset()
        await rt.send("/chat/b", {"check": True})
        await rt.run_until_idle()
        assert offsets == ["done"]
        head = await rt.store.head("chat/b/main")
        assert len(reads.backward) == 1 and reads.backward == ["now"]
        assert all(o != "-1" for o in reads.forward)
        assert head.next_offset > format_offset(750)


@pytest.mark.parametrize("after", ["garbage"])
async def test_outcome_with_a_bad_offset_raises(store_url: str, after: str) -> None:
    from streams import BadOffset

    async with runtime(store_url) as (rt, _reads):
        await rt.spawn("/counter/c")
        with pytest.raises(BadOffset):
            await rt.outcome("/counter/c", "k", after=after)
