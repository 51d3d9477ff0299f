"""Every wake ends, visibly: wake timeouts, handlers that ignore cancellation, kills that cancel
running wakes (within a process and across two), poison messages, runs left open, ``sleep()``
and ``on_create``. Real stores (memory, SQLite, PostgreSQL) and real workers."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pydantic import BaseModel

import entities._run
from entities import (
    DeadLetter,
    HandlerContext,
    Registry,
    Runtime,
    VirtualClock,
    WakeEvent,
    collection,
)
from entities._calls import call_maybe_async
from entities._records import DEAD_NS, PENDING_NS
from entities.agent._anthropic import AnthropicModel
from tests.entities._fake_providers import FakeTurn, running_fake


class Total(BaseModel):
    key: str
    value: int = 0


registry = Registry()
calls: dict[str, list[Any]] = {}


def note(name: str, value: Any = None) -> None:
    calls.setdefault(name, []).append(value)


async def until(check: Callable[[], Any]) -> None:
    """Poll ``check`` (sync or async) until it is true."""
    while True:
        if await call_maybe_async(check):
            return
        await anyio.sleep(0.01)


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    calls.clear()


@registry.define("sleepy", wake_timeout=0.3, max_attempts=2)
async def sleepy(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        if message.payload == {"text": "hang"}:
            note("hang", wake.attempt)
            await anyio.sleep(60)
        ctx.reply(f"ok {message.payload['text']}", to=message)


def on_stop(ctx: HandlerContext, reason: str) -> None:
    note("on_stop", reason)


@registry.define("stoppable", on_stop=on_stop)
async def stoppable(ctx: HandlerContext, wake: WakeEvent) -> None:
    if wake.messages:
        note("started", time.monotonic())
        await anyio.sleep(60)
        note("after the kill")


@registry.define("counter", state={"totals": collection(Total)}, max_attempts=2)
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    totals = ctx.db.collections.totals
    for message in wake.messages:
        row = totals.get("total") or Total(key="total")
        totals.upsert(Total(key="total", value=row.value + message.payload["add"]))
        ctx.reply(totals.get("total").value, to=message)


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        yield runtime


async def runs_of(rt: Runtime, url: str) -> list[dict[str, Any]]:
    events, _ = await rt.read(url, "-1", limit=10_000)
    return [e["value"] for e in events if e["type"] == "runs" and "wake_id" in e["value"]]


async def dead_letters(rt: Runtime) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(raw) for _k, raw in await rt.store.kv_scan(DEAD_NS)]


async def test_a_wake_past_its_timeout_fails_and_is_dead_lettered(rt: Runtime) -> None:
    await rt.spawn("/sleepy/s")
    hang = await rt.send("/sleepy/s", {"text": "hang"})
    started = time.monotonic()
    await rt.run_until_idle()
    assert time.monotonic() - started < 5  # two attempts of 0.3 s, not 60 s each
    assert calls["hang"] == [1, 2]
    runs = [r for r in await runs_of(rt, "/sleepy/s") if r["status"] != "completed"]
    assert [(r["status"], r.get("reason")) for r in runs] == [
        ("failed", "timeout"),
        ("dead_lettered", "timeout"),
    ]
    assert runs[-1]["error"].startswith("WakeTimeout: the wake ran past its timeout of 0.3 s")
    [letter] = await dead_letters(rt)
    assert letter.url == "/sleepy/s" and letter.attempts == 2 and letter.messages == 1
    assert letter.error_type == "WakeTimeout" and letter.id == f"sleepy:s:{letter.wake_id}"
    # the entity goes on with its next messages
    later = await rt.send("/sleepy/s", {"text": "later"})
    await rt.run_until_idle()
    assert await rt.replies("/sleepy/s", later.key) == ["ok later"]
    assert await rt.replies("/sleepy/s", hang.key) == []


stuck = Registry()
release = anyio.Event()


@stuck.define("deaf", wake_timeout=0.2, max_attempts=1)
async def deaf(ctx: HandlerContext, wake: WakeEvent) -> None:
    note("deaf started")
    while not release.is_set():  # swallows every cancellation until the test lets it go
        try:
            await anyio.sleep(0.05)
        except anyio.get_cancelled_exc_class():
            note("ignored a cancellation")
    note("deaf ended")


@stuck.define("other")
async def other(ctx: HandlerContext, wake: WakeEvent) -> None:
    note("other ran")
    ctx.reply("done")


async def test_a_handler_that_ignores_cancellation_is_given_up(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    global release
    release = anyio.Event()
    monkeypatch.setattr(entities._run, "GRACE", 0.3)
    async with Runtime(stuck, store_url, concurrency=1) as rt:
        await rt.spawn("/deaf/d")
        stop = anyio.Event()
        worker = rt.worker(poll_interval=0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            with anyio.fail_after(10):
                await until(lambda: "deaf started" in calls)
                await rt.spawn("/other/o")  # the only lane is taken by the deaf handler
                receipt = await rt.send("/other/o", {"text": "hi"})
                await until(lambda: rt.replies("/other/o", receipt.key))
            assert "ignored a cancellation" in calls and "deaf ended" not in calls
            runs = await runs_of(rt, "/deaf/d")
            assert [(r["status"], r.get("reason")) for r in runs] == [("dead_lettered", "timeout")]
            release.set()
            stop.set()
        assert "deaf ended" in calls
        assert len(await runs_of(rt, "/deaf/d")) == 1  # its late end committed nothing


async def test_a_kill_cancels_the_running_wake_and_runs_on_stop(store_url: str) -> None:
    async with Runtime(registry, store_url) as rt:
        await rt.spawn("/stoppable/k")
        await rt.send("/stoppable/k", {"go": 1})
        await _kill_while_running(rt, rt, "/stoppable/k")


async def test_a_kill_from_another_process_cancels_the_running_wake(
    shared_store_url: str,
) -> None:
    """Two runtimes on two store objects, as two processes hold them: one runs the worker, the
    other (an HTTP server, say) kills the entity."""
    async with (
        Runtime(registry, shared_store_url) as running,
        Runtime(registry, shared_store_url) as killing,
    ):
        await killing.spawn("/stoppable/x")
        await killing.send("/stoppable/x", {"go": 1})
        await _kill_while_running(running, killing, "/stoppable/x")


async def _kill_while_running(
    running: Runtime,
    killing: Runtime,
    url: str,
    started: Callable[[], bool] = lambda: "started" in calls,
) -> None:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(running.worker(poll_interval=0.05).run, stop)
        with anyio.fail_after(10):
            await until(started)
            killed_at = time.monotonic()
            await killing.kill(url)
            await until(lambda: "on_stop" in calls)
        assert time.monotonic() - killed_at < 1.0  # cancelled within a second
        stop.set()
    assert calls["on_stop"] == ["killed"] and "after the kill" not in calls
    events, _ = await killing.read(url, "-1")
    tail = [(e["type"], (e.get("value") or {}).get("status")) for e in events[-3:]]
    assert tail == [("signals", None), ("runs", "cancelled"), ("entity_stopped", None)]
    assert events[-3]["value"] == {"signal": "kill", "reason": "killed"}


async def test_a_poison_message_is_dead_lettered_and_the_entity_goes_on(rt: Runtime) -> None:
    await rt.spawn("/counter/c")
    first = await rt.send("/counter/c", {"add": 1})
    await rt.run_until_idle()
    assert await rt.replies("/counter/c", first.key) == [1]
    # a valid message whose result does not encode (over 64 bits): the commit cannot be made
    poison = await rt.send("/counter/c", {"add": 2**64 - 1})
    await rt.run_until_idle()
    [letter] = await dead_letters(rt)
    assert letter.url == "/counter/c" and letter.attempts == 2
    assert "64-bit" in letter.error
    assert await rt.replies("/counter/c", poison.key) == []
    after = await rt.send("/counter/c", {"add": 2})
    await rt.run_until_idle()
    assert await rt.replies("/counter/c", after.key) == [3]
    assert await rt.store.kv_get(PENDING_NS, "/counter/c") is None
    statuses = [r["status"] for r in await runs_of(rt, "/counter/c")]
    assert statuses == ["completed", "failed", "dead_lettered", "completed"]  # creation + 1 first


lifecycle = Registry()
holder: dict[str, Runtime] = {}


def on_create(ctx: HandlerContext) -> None:
    note("on_create", dict(ctx.args))
    ctx.db.collections.totals.insert(Total(key="created"))


@lifecycle.define("life", state={"totals": collection(Total)}, on_create=on_create, max_attempts=2)
async def life(ctx: HandlerContext, wake: WakeEvent) -> None:
    if wake.first_wake and wake.attempt == 1 and ctx.args.get("fail_first"):
        raise RuntimeError("the first attempt fails")
    run = ctx.record_run()  # never ended by the handler
    run.attach_response("partial")
    texts = [m.text for m in wake.messages]
    note("handled", texts)
    if "sleep" in texts:
        await holder["rt"].send(ctx.entity_url, {"text": "while asleep"})  # arrives now
        ctx.sleep()


@pytest.fixture
async def life_rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(lifecycle, store_url, clock=VirtualClock()) as runtime:
        holder["rt"] = runtime
        yield runtime


async def test_on_create_runs_once_in_the_first_wake(life_rt: Runtime) -> None:
    rt = life_rt
    await rt.spawn("/life/l", args={"fail_first": True})
    await rt.run_until_idle()
    await rt.send("/life/l", {"text": "hello"})
    await rt.run_until_idle()
    # two attempts of the first wake ran it; only the one that committed counts
    assert calls["on_create"] == [{"fail_first": True}, {"fail_first": True}]
    state = await rt.state_of("/life/l")
    assert list(state["totals"]) == ["created"]
    assert calls["handled"] == [[], ["hello"]]


async def test_runs_left_open_are_ended_at_commit(life_rt: Runtime) -> None:
    await life_rt.spawn("/life/r")
    await life_rt.run_until_idle()
    view = await life_rt.view("/life/r")
    opened = [v for k, v in view["runs"].items() if ".run" in k]
    assert [(r["status"], r["finish_reason"], r["response"]) for r in opened] == [
        ("completed", "wake_ended", "partial")
    ]


async def test_sleep_leaves_what_arrived_during_the_wake_for_the_next_event(
    life_rt: Runtime,
) -> None:
    rt = life_rt
    await rt.spawn("/life/z")
    await rt.run_until_idle()
    await rt.send("/life/z", {"text": "sleep"})
    await rt.run_until_idle()
    assert calls["handled"][-1] == ["sleep"]
    assert await rt.store.kv_get(PENDING_NS, "/life/z") is None  # not woken again
    await rt.send("/life/z", {"text": "next"})
    await rt.run_until_idle()
    assert calls["handled"][-1] == ["while asleep", "next"]


AGENT = """
import os, sys, time
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(60)
print("too late")
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_kill_terminates_the_subprocess_of_a_running_process_agent(
    tmp_path: Path,
) -> None:
    script, marker = tmp_path / "agent.py", tmp_path / "pid"
    script.write_text(AGENT)
    agents = Registry()
    agents.define_process("proc", command=[sys.executable, str(script), str(marker)])
    async with Runtime(agents, f"sqlite:///{tmp_path / 'p.db'}") as rt:
        await rt.spawn("/proc/p")
        await rt.send("/proc/p", {"text": "work"})
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.worker(poll_interval=0.05).run, stop)
            with anyio.fail_after(10):
                await until(marker.exists)
                await until(lambda: marker.read_text().strip().isdigit())
                pid = int(marker.read_text())
                assert _alive(pid)
                await rt.kill("/proc/p")
                await until(lambda: not _alive(pid))  # the process group was killed
            stop.set()
        runs = await runs_of(rt, "/proc/p")
        assert runs[-1]["status"] == "cancelled"


async def test_a_kill_aborts_a_model_call_in_flight(tmp_path: Path) -> None:
    """The provider answers only after 30 s; the kill cancels the wake (and with it the SDK's
    request) at once instead of waiting for the model."""
    with running_fake(log_path=tmp_path / "requests.jsonl") as fake:
        fake.script(FakeTurn(text="too late", delay=30))
        model = AnthropicModel("claude-fake-1", api_key="k", base_url=fake.url, max_retries=0)
        agents = Registry()

        @agents.define("bot", on_stop=on_stop)
        async def bot(ctx: HandlerContext, wake: WakeEvent) -> None:
            ctx.use_agent("You are slow.", model)
            note("started", time.monotonic())
            await ctx.agent.run()
            note("after the kill")

        async with Runtime(agents, f"sqlite:///{tmp_path / 'b.db'}") as rt:
            await rt.spawn("/bot/b")
            await rt.send("/bot/b", {"text": "hi"})
            await _kill_while_running(rt, rt, "/bot/b", started=lambda: fake.count == 1)
