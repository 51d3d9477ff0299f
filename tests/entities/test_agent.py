"""The agent loop with the scripted test model: tools, validation, rounds, streaming, journal,
context and replay, on every store backend."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import BaseModel

from entities import ContextError, HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities import collection as coll
from entities.agent import ModelResponse, ScriptRequest, ToolCall, tool
from examples import assistant


async def _events(rt: Runtime, url: str, type_: str) -> list[dict[str, Any]]:
    events, _ = await rt.read(url, limit=100_000)
    return [e for e in events if e["type"] == type_]


async def test_assistant_example_calls_add_and_answers(store_url: str) -> None:
    async with Runtime(assistant.registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/assistant/a1")
        receipt = await rt.send("/assistant/a1", {"text": "what is 2+3"})
        await rt.run_until_idle()
        replies = await rt.replies("/assistant/a1", receipt.key)
        assert replies == ["The answer is 5."]
        calls = [e["value"] for e in await _events(rt, "/assistant/a1", "tool_calls")]
        assert [(c["name"], c["arguments"], c["result"], c["error"]) for c in calls] == [
            ("add", {"a": 2, "b": 3}, 5, None)
        ]
        assert calls[0]["duration_ms"] >= 0
        deltas = [e["value"]["delta"] for e in await _events(rt, "/assistant/a1", "text_deltas")]
        assert "".join(deltas) == "The answer is 5."
        report = await rt.replay("/assistant/a1")
        assert report.ok and len(report.wakes) == 1


async def test_invalid_tool_arguments_go_back_to_the_model(store_url: str) -> None:
    seen: list[Any] = []

    @tool
    def double(n: int) -> int:
        """Double a number."""
        return n * 2

    def script(request: ScriptRequest) -> Any:
        results = request.tool_results
        if not results:
            return ModelResponse(tool_calls=(ToolCall("c1", "double", {"n": "many"}),))
        seen.append((results[-1].is_error, results[-1].content))
        if len(seen) == 1:
            return ModelResponse(tool_calls=(ToolCall("c2", "nope", {}),))
        return "gave up"

    registry = Registry()
    results: list[Any] = []

    @registry.define("a")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        ctx.use_agent("sys", tools=[double], test_responses=script)
        results.append(await ctx.agent.run())

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/a/x", initial_message={"text": "go"})
        await rt.run_until_idle()
    assert seen[0][0] is True and "invalid arguments" in seen[0][1] and "n" in seen[0][1]
    assert seen[1][0] is True and "unknown tool 'nope'" in seen[1][1]
    result = results[0]
    assert result.success and result.text == "gave up" and result.rounds == 3
    assert [c["error"] is not None for c in result.tool_calls] == [True, True]


async def test_round_limit_and_test_responses_by_prior_runs(store_url: str) -> None:
    registry = Registry()
    results: list[Any] = []

    @registry.define("loop")
    async def looping(ctx: HandlerContext, wake: WakeEvent) -> None:
        ctx.use_agent(
            "sys", max_rounds=3, test_responses=lambda r: {"tool_calls": [{"name": "missing"}]}
        )
        results.append(await ctx.agent.run())

    @registry.define("canned")
    async def canned(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.use_agent("sys", test_responses=["first", "second", "third"])
            results.append(await ctx.agent.run())

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/loop/l", initial_message={"text": "hi"})
        await rt.run_until_idle()
        assert results[0].success is False and "max_rounds=3" in (results[0].error or "")
        await rt.spawn("/canned/c")
        await rt.run_until_idle()  # the first wake (no message): run 1 without the agent
        for text in ("a", "b"):
            receipt = await rt.send("/canned/c", {"text": text})
            await rt.run_until_idle()
            assert len(await rt.replies("/canned/c", receipt.key)) == 1
        assert [r.text for r in results[1:]] == ["second", "third"]


async def test_model_and_tool_steps_are_journaled_across_a_retry(store_url: str) -> None:
    model_calls: list[int] = []
    tool_runs: list[int] = []

    @tool
    def lookup(q: str) -> str:
        """Look something up."""
        tool_runs.append(1)
        return f"result for {q}"

    def script(request: ScriptRequest) -> Any:
        model_calls.append(request.round)
        if request.round < 2:
            return ModelResponse(
                tool_calls=(ToolCall(f"c{request.round}", "lookup", {"q": str(request.round)}),)
            )
        return "done"

    registry = Registry()
    attempts: list[int] = []

    @registry.define("a", max_attempts=2)
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        if not wake.messages:
            return
        attempts.append(wake.attempt)
        ctx.use_agent("sys", tools=[lookup], test_responses=script)
        await ctx.agent.run()
        if wake.attempt == 1:
            raise RuntimeError("crash after three model calls and two tool calls")

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/a/x")
        await rt.run_until_idle()
        receipt = await rt.send("/a/x", {"text": "go"})
        await rt.run_until_idle()
        assert attempts == [1, 2]
        assert model_calls == [0, 1, 2]  # the retry re-used all three recorded responses
        assert len(tool_runs) == 2
        assert await rt.replies("/a/x", receipt.key) == ["done"]


async def test_context_entries_and_sources_reach_the_model(store_url: str) -> None:
    systems: list[str] = []
    registry = Registry()

    @registry.define("a")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        if not wake.messages:
            return
        if ctx.get_context("persona") is None:
            ctx.insert_context("persona", "You like short answers.", name="persona")
        with pytest.raises(ContextError):
            ctx.use_context(
                source_budget=10, sources={"big": {"content": "x", "max": 50, "cache": "pinned"}}
            )
        ctx.use_context(
            source_budget=40,
            sources={
                "rules": {"content": "Be kind.", "max": 10, "cache": "pinned"},
                "news": {"content": lambda: "n" * 1000, "cache": "volatile"},
            },
        )

        def script(request: ScriptRequest) -> str:
            systems.append(request.system)
            return f"seen {len(request.messages)} messages"

        ctx.use_agent("base prompt", test_responses=script)
        await ctx.agent.run()

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/a/x")
        for text in ("one", "two"):
            await rt.send("/a/x", {"text": text})
            await rt.run_until_idle()
    system = systems[-1]
    assert system.startswith("base prompt")
    assert '<context name="persona">' in system and "short answers" in system
    assert "Be kind." in system and "…(truncated)" in system
    assert len(system) < 400  # the volatile source was cut to the budget


async def test_timeline_messages_project_inbox_and_replies(store_url: str) -> None:
    registry = Registry()
    windows: list[list[tuple[str, str]]] = []

    @registry.define("a")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        for m in wake.messages:
            ctx.reply(f"echo {m.text}")
        windows.append([(m.role, m.content) for m in await ctx.timeline_messages(last=3)])

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/a/x")
        for text in ("one", "two"):
            await rt.send("/a/x", {"text": text})
            await rt.run_until_idle()
    assert windows[-1] == [("user", "two"), ("assistant", "echo two")]


async def test_replay_reports_injected_nondeterminism(store_url: str) -> None:
    class Row(BaseModel):
        key: str
        value: float

    registry = Registry()

    @registry.define("r", state={"rows": coll(Row)})
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        for m in wake.messages:
            ctx.state.rows.upsert(Row(key="stable", value=ctx.now()))  # journaled: replays
            if m.payload.get("random"):
                ctx.state.rows.upsert(Row(key="bad", value=random.random()))  # not journaled

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/r/x")
        await rt.send("/r/x", {"random": False})
        await rt.run_until_idle()
        await rt.send("/r/x", {"random": True})
        await rt.run_until_idle()
        report = await rt.replay("/r/x")
        assert [w.ok for w in report.wakes] == [True, False]
        divergence = report.wakes[1].divergences[0]
        assert divergence.where == "state:rows/bad"
        assert divergence.expected["value"]["value"] != divergence.got["value"]["value"]
        assert (await rt.replay("/r/x", wake=1)).ok


async def test_timeline_projects_tool_calls_of_earlier_runs(store_url: str) -> None:
    windows: list[list[tuple[str, str, tuple[str, ...]]]] = []
    registry = Registry()

    def script(request: ScriptRequest) -> Any:
        windows.append(
            [(m.role, m.content, tuple(c.name for c in m.tool_calls)) for m in request.messages]
        )
        if request.last_user_text == "add" and not request.tool_results:
            return ModelResponse(tool_calls=(ToolCall("c9", "add", {"a": 1, "b": 2}),))
        return "ok"

    @registry.define("a")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.use_agent("sys", tools=[assistant.add], test_responses=script)
            await ctx.agent.run()

    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/a/x")
        for text in ("add", "again"):
            await rt.send("/a/x", {"text": text})
            await rt.run_until_idle()
    assert windows[-1] == [
        ("user", "add", ()),
        ("assistant", "", ("add",)),
        ("tool", "3", ()),
        ("assistant", "ok", ()),
        ("user", "again", ()),
    ]
