"""Send modes: ``queued`` (the default), ``steer`` (handed to an agent run that is going,
before its next model round, as a new user turn the run's reply answers too; else an
ordinary message) and ``interrupt`` (interrupt the running wake, then deliver, in one
transaction)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx2
import pytest

from entities import (
    HandlerContext,
    InvalidSendMode,
    Registry,
    Runtime,
    WakeEvent,
)
from entities.agent import ModelResponse, ScriptRequest, ToolCall, tool
from entities.server import create_app
from tests._live import serving

registry = Registry()
state: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _fresh() -> None:
    state.clear()
    state["release"] = anyio.Event()
    state["waiting"] = anyio.Event()
    state["seen"] = []


@tool
async def slow_lookup(topic: str) -> str:
    """Look something up (slowly: the test decides when it returns)."""
    state["waiting"].set()
    await state["release"].wait()
    return f"facts about {topic}"


def scripted(request: ScriptRequest) -> Any:
    state["seen"].append([(m.role, m.content) for m in request.messages])
    if request.round == 0:
        return ModelResponse(tool_calls=(ToolCall("c1", "slow_lookup", {"topic": "cats"}),))
    return f"answer after: {request.last_user_text}"


@registry.define("agent")
async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
    if not wake.messages:
        return
    ctx.use_agent(system_prompt="test", tools=[slow_lookup], test_responses=scripted)
    await ctx.agent.run()


@registry.define("holder")
async def holder(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        state["seen"].append(message.payload)
        if message.payload.get("hold"):
            state["waiting"].set()
            await state["release"].wait()
        ctx.reply(f"done {message.payload.get('n')}", to=message)


async def until(check: Callable[[], Any]) -> None:
    """Poll ``check`` until it is true; an awaitable's result counts: an outcome that is no
    longer pending."""
    while True:
        found = check()
        if hasattr(found, "__await__"):
            found = (await found).status != "pending"
        if found:
            return
        await anyio.sleep(0.01)


@pytest.fixture
async def running(shared_store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, shared_store_url) as rt:
        stop = anyio.Event()
        task = asyncio.create_task(rt.worker(poll_interval=0.05).run(stop))
        try:
            yield rt
        finally:
            stop.set()
            await task


async def test_a_steering_message_joins_the_run_that_is_going(running: Runtime) -> None:
    rt = running
    await rt.spawn("/agent/a")
    first = await rt.send("/agent/a", {"text": "tell me about cats"})
    with anyio.fail_after(10):
        await state["waiting"].wait()  # round 0's tool call is running
    steer = await rt.send("/agent/a", {"text": "only about their sleep"}, mode="steer")
    state["release"].set()
    with anyio.fail_after(10):
        await until(lambda: rt.outcome("/agent/a", first.key))
        await until(lambda: rt.outcome("/agent/a", steer.key))
    answer = "answer after: only about their sleep"
    assert await rt.replies("/agent/a", first.key) == [answer]
    assert await rt.replies("/agent/a", steer.key) == [answer]  # answered by the same run
    assert state["seen"][1][-1] == ("user", "only about their sleep")  # a user turn in round 1
    await anyio.sleep(0.3)  # the next wake folds the steered message away: no second run
    assert len(state["seen"]) == 2
    events, _ = await rt.read("/agent/a", "-1", limit=10_000)
    runs = [e for e in events if e["type"] == "runs" and "wake_id" in (e.get("value") or {})]
    # the creation and the first message (one wake or two), then no run for the steered one
    assert 1 <= len(runs) <= 2 and all(r["value"]["status"] == "completed" for r in runs)
    info = await rt.get("/agent/a")
    assert (info.pending, info.queue) == (False, 0)


async def test_a_steering_message_with_no_run_going_is_an_ordinary_message(
    running: Runtime,
) -> None:
    rt = running
    await rt.spawn("/agent/b")
    state["release"].set()
    steer = await rt.send("/agent/b", {"text": "hello"}, mode="steer")
    with anyio.fail_after(10):
        await until(lambda: rt.outcome("/agent/b", steer.key))
    assert await rt.replies("/agent/b", steer.key) == ["answer after: hello"]


async def test_an_interrupting_message_interrupts_then_is_delivered(running: Runtime) -> None:
    rt = running
    await rt.spawn("/holder/h")
    stuck = await rt.send("/holder/h", {"n": 1, "hold": True})
    with anyio.fail_after(10):
        await state["waiting"].wait()
    urgent = await rt.send("/holder/h", {"n": 2}, mode="interrupt")
    with anyio.fail_after(10):
        await until(lambda: rt.outcome("/holder/h", urgent.key))
    assert (await rt.outcome("/holder/h", stuck.key)).status == "interrupted"
    assert await rt.replies("/holder/h", urgent.key) == ["done 2"]
    events, _ = await rt.read("/holder/h", "-1", limit=10_000)
    inbox = [e for e in events if e["type"] == "inbox"]
    assert inbox[-1]["value"]["mode"] == "interrupt"
    signals = [e["value"] for e in events if e["type"] == "signals"]
    assert signals[-1]["signal"] == "interrupt" and urgent.key in signals[-1]["reason"]


async def test_bad_modes_and_http(shared_store_url: str) -> None:
    async with Runtime(registry, shared_store_url) as rt:
        await rt.spawn("/holder/x")
        with pytest.raises(InvalidSendMode):
            await rt.send("/holder/x", {"n": 1}, mode="later")
        async with serving(create_app(rt)) as base, httpx2.AsyncClient(base_url=base) as http:
            path = "/_entities/entities/holder/x/send"
            bad = await http.post(path, json={"payload": {"n": 1}, "mode": "later"})
            assert bad.status_code == 422
            sent = await http.post(path, json={"payload": {"n": 2}, "mode": "interrupt"})
            assert sent.status_code == 202
            again = await http.post(
                path,
                json={"payload": {"n": 3}, "mode": "interrupt"},
                headers={"Idempotency-Key": "k1"},
            )
            same = await http.post(
                path,
                json={"payload": {"n": 3}, "mode": "interrupt"},
                headers={"Idempotency-Key": "k1"},
            )
            assert again.json() == same.json()
        events, _ = await rt.read("/holder/x", "-1")
        assert [e["value"]["payload"]["n"] for e in events if e["type"] == "inbox"] == [2, 3]
