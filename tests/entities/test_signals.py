"""Signals: pause (no new wake starts; a running one finishes), resume (what queued runs),
interrupt (the running wake is cancelled, its run ends ``interrupted``, the next starts), the
``on_signal`` hook, over Python, HTTP and the CLI, within one process and across two."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx2
import pytest
from pydantic import BaseModel

from entities import (
    EntityNotFound,
    EntityStopped,
    HandlerContext,
    InvalidSignal,
    Registry,
    Runtime,
    Signal,
    VirtualClock,
    WakeEvent,
    collection,
)
from entities._records import PAUSED_NS
from entities.server import create_app
from tests._live import serving


class Total(BaseModel):
    key: str
    value: int = 0


class Seen(BaseModel):
    key: str
    signal: str
    reason: str | None = None
    sender: str | None = None


registry = Registry()
calls: dict[str, list[Any]] = {}
gate = {"event": anyio.Event()}


def note(name: str, value: Any = None) -> None:
    calls.setdefault(name, []).append(value)


async def until(check: Callable[[], Any]) -> None:
    """Poll ``check`` (sync or async) until it is true."""
    while True:
        found = check()
        if hasattr(found, "__await__"):
            found = await found
        if found:
            return
        await anyio.sleep(0.01)


async def answered(rt: Runtime, url: str, key: str) -> bool:
    return (await rt.outcome(url, key)).status != "pending"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    calls.clear()
    gate["event"] = anyio.Event()


def on_signal(ctx: HandlerContext, signal: Signal) -> None:
    seen = ctx.db.collections.seen
    seen.upsert(
        Seen(
            key=f"{len(seen.keys()):03d}",
            signal=signal.signal,
            reason=signal.reason,
            sender=signal.sender,
        )
    )
    note("on_signal", signal.signal)


def on_stop(ctx: HandlerContext, reason: str) -> None:
    note("on_stop", reason)


@registry.define(
    "counter",
    state={"totals": collection(Total), "seen": collection(Seen)},
    on_signal=on_signal,
    on_stop=on_stop,
)
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    note("handler", [m.payload for m in wake.messages])
    totals = ctx.db.collections.totals
    for message in wake.messages:
        if message.payload.get("hold"):
            note("holding")
            await gate["event"].wait()
        row = totals.get("total") or Total(key="total")
        totals.upsert(Total(key="total", value=row.value + message.payload.get("add", 0)))
        ctx.reply(totals.get("total").value, to=message)


@registry.define("plain")
async def plain(ctx: HandlerContext, wake: WakeEvent) -> None:
    note("plain", [m.payload for m in wake.messages])


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        yield runtime


async def total(rt: Runtime, url: str) -> int:
    row = (await rt.state_of(url))["totals"].get("total")
    return 0 if row is None else int(row["value"])


async def test_pause_queues_messages_and_resume_runs_them(rt: Runtime) -> None:
    await rt.spawn("/counter/c")
    await rt.run_until_idle()
    info = await rt.signal("/counter/c", "pause", reason="maintenance", sender="ops")
    assert info.status == "paused"
    first = await rt.send("/counter/c", {"add": 1})
    await rt.send("/counter/c", {"add": 2})
    assert await rt.run_until_idle() == 0  # nothing starts while paused
    assert await total(rt, "/counter/c") == 0
    paused = await rt.get("/counter/c")
    assert (paused.status, paused.pending, paused.queue) == ("paused", True, 3)  # 2 + the pause
    assert [e.url for e in await rt.list_entities(status="paused")] == ["/counter/c"]
    # a worker's claim refuses too, even given the mark directly
    assert await rt.worker().claim("/counter/c") is None
    assert (await rt.outcome("/counter/c", first.key)).status == "pending"
    resumed = await rt.signal("/counter/c", "resume")
    assert resumed.status == "idle"
    await rt.run_until_idle()
    assert await total(rt, "/counter/c") == 3
    assert await rt.replies("/counter/c", first.key) == [1]
    seen = (await rt.state_of("/counter/c"))["seen"]
    assert [(r["signal"], r["reason"], r["sender"]) for r in seen.values()] == [
        ("pause", "maintenance", "ops"),
        ("resume", None, None),
    ]
    events, _ = await rt.read("/counter/c", "-1", limit=10_000)
    assert [e["value"]["signal"] for e in events if e["type"] == "signals"] == ["pause", "resume"]
    assert await rt.store.kv_scan(PAUSED_NS) == []


async def test_a_wake_of_signals_alone_runs_on_signal_and_never_the_handler(rt: Runtime) -> None:
    await rt.spawn("/counter/s")
    await rt.spawn("/plain/p")
    await rt.run_until_idle()
    calls.clear()
    for url in ("/counter/s", "/plain/p"):
        await rt.signal(url, "pause")
        await rt.signal(url, "resume")
        await rt.signal(url, "interrupt")  # nothing running: recorded, and a wake for the hook
    await rt.run_until_idle()
    assert calls == {"on_signal": ["pause", "resume", "interrupt"]}
    assert (await rt.get("/plain/p")).status == "idle"


async def test_bad_signals_change_nothing(rt: Runtime) -> None:
    await rt.spawn("/counter/b")
    before, _ = await rt.read("/counter/b", "-1")
    with pytest.raises(InvalidSignal, match="unknown signal 'stop'"):
        await rt.signal("/counter/b", "stop")
    with pytest.raises(EntityNotFound):
        await rt.signal("/counter/none", "pause")
    await rt.kill("/counter/b")
    with pytest.raises(EntityStopped):
        await rt.signal("/counter/b", "pause")
    after, _ = await rt.read("/counter/b", "-1")
    assert [e["type"] for e in after[len(before) :]] == ["signals", "entity_stopped"]  # the kill


async def _worker(rt: Runtime, stop: anyio.Event, tg: Any) -> None:
    tg.start_soon(rt.worker(poll_interval=0.05).run, stop)


async def test_pause_lets_the_running_wake_finish(store_url: str) -> None:
    async with Runtime(registry, store_url) as rt, anyio.create_task_group() as tg:
        stop = anyio.Event()
        await _worker(rt, stop, tg)
        await rt.spawn("/counter/r")
        held = await rt.send("/counter/r", {"add": 5, "hold": True})
        with anyio.fail_after(10):
            await until(lambda: "holding" in calls)
            await rt.signal("/counter/r", "pause")
            later = await rt.send("/counter/r", {"add": 1})
            gate["event"].set()
            await until(lambda: answered(rt, "/counter/r", held.key))
        assert (await rt.outcome("/counter/r", held.key)).replies == [5]
        await anyio.sleep(0.3)  # several worker rounds: the queued message must not run
        assert (await rt.outcome("/counter/r", later.key)).status == "pending"
        assert (await rt.get("/counter/r")).status == "paused"
        await rt.signal("/counter/r", "resume")
        with anyio.fail_after(10):
            await until(lambda: answered(rt, "/counter/r", later.key))
        assert (await rt.outcome("/counter/r", later.key)).replies == [6]
        stop.set()


@pytest.mark.parametrize("processes", [1, 2], ids=["one-runtime", "two-runtimes"])
async def test_interrupt_cancels_the_running_wake_and_the_next_starts(
    shared_store_url: str, processes: int
) -> None:
    async with (
        Runtime(registry, shared_store_url) as running,
        Runtime(registry, shared_store_url) as other,
        anyio.create_task_group() as tg,
    ):
        signaller = running if processes == 1 else other
        stop = anyio.Event()
        await _worker(running, stop, tg)
        await signaller.spawn("/counter/i")
        stuck = await signaller.send("/counter/i", {"add": 100, "hold": True})
        with anyio.fail_after(10):
            await until(lambda: "holding" in calls)
            next_one = await signaller.send("/counter/i", {"add": 1})
            began = time.monotonic()
            await signaller.signal("/counter/i", "interrupt", reason="wrong way")
            await until(lambda: "on_stop" in calls)
            assert time.monotonic() - began < 2.0
            await until(lambda: answered(signaller, "/counter/i", next_one.key))
        assert calls["on_stop"] == ["interrupted"]
        outcome = await signaller.outcome("/counter/i", stuck.key)
        assert (outcome.status, outcome.replies, outcome.failed) == ("interrupted", [], True)
        assert (await signaller.outcome("/counter/i", next_one.key)).replies == [1]
        assert await total(signaller, "/counter/i") == 1  # nothing of the interrupted wake
        events, _ = await signaller.read("/counter/i", "-1", limit=10_000)
        runs = [e["value"] for e in events if e["type"] == "runs" and "wake_id" in e["value"]]
        interrupted = [r for r in runs if r["status"] == "interrupted"]
        assert len(interrupted) == 1 and interrupted[0]["reason"] == "wrong way"
        assert "interrupt" in calls["on_signal"]
        stop.set()


async def test_signals_over_http_and_the_cli_shape(store_url: str) -> None:
    async with Runtime(registry, store_url) as runtime:
        await runtime.spawn("/counter/h")
        async with serving(create_app(runtime)) as base:
            async with httpx2.AsyncClient(base_url=base) as http:
                path = "/_entities/entities/counter/h/signal"
                paused = await http.post(path, json={"signal": "pause", "reason": "r"})
                assert paused.status_code == 200 and paused.json()["status"] == "paused"
                bad = await http.post(path, json={"signal": "stop"})
                assert bad.status_code == 422
                extra = await http.post(path, json={"signal": "pause", "nope": 1})
                assert extra.status_code == 422
                missing = await http.post(
                    "/_entities/entities/counter/zz/signal", json={"signal": "pause"}
                )
                assert missing.status_code == 404
                resumed = await http.post(path, json={"signal": "resume"})
                assert resumed.json()["status"] in ("idle", "running")
        events, _ = await runtime.read("/counter/h", "-1")
        signals = [e["value"] for e in events if e["type"] == "signals"]
        assert [(s["signal"], s["from"]) for s in signals] == [
            ("pause", "/_http/client"),
            ("resume", "/_http/client"),
        ]
