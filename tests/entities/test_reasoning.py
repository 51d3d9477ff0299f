"""Reasoning: models that stream their reasoning (Anthropic thinking, reasoning deltas of
OpenAI-compatible endpoints) write ``reasoning_deltas`` while the call streams and a
``reasoning`` row per round; Anthropic's signed thinking goes back with its tool-use turn;
compaction drops the deltas of ended runs."""

from __future__ import annotations

from typing import Any

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.agent import ModelClient, tool
from entities.agent._anthropic import AnthropicModel
from entities.agent._openai import OpenAIModel
from tests.entities._fake_providers import FakeProvider, FakeToolCall, FakeTurn
from tests.entities._fake_providers import fake_provider as fake_provider


@tool
def lookup(topic: str) -> str:
    """Look a topic up."""
    return f"facts about {topic}"


def agent_registry(model: ModelClient) -> Registry:
    registry = Registry()

    @registry.define("a")
    async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.use_agent("Think first.", model=model, tools=[lookup])
            result = await ctx.agent.run()
            assert result.success, result.error

    return registry


def of_type(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e["value"] for e in events if e["type"] == type_]


async def test_anthropic_thinking_is_streamed_recorded_and_sent_back(
    fake_provider: FakeProvider, store_url: str
) -> None:
    model = AnthropicModel(
        "claude-fake",
        api_key="k",
        base_url=fake_provider.anthropic_base_url,
        max_retries=0,
        thinking_budget=2048,
    )
    fake_provider.script(
        FakeTurn(
            reasoning="The user wants cats. I should look it up.",
            tool_calls=(FakeToolCall("lookup", {"topic": "cats"}, id="t1"),),
            signature="sig-1",
        ),
        FakeTurn(reasoning="Now I can answer.", text="Cats sleep a lot."),
    )
    async with Runtime(agent_registry(model), store_url) as rt:
        await rt.spawn("/a/x")
        receipt = await rt.send("/a/x", {"text": "cats?"})
        await rt.run_until_idle()
        assert await rt.replies("/a/x", receipt.key) == ["Cats sleep a lot."]
        events, _ = await rt.read("/a/x", limit=10_000)
        deltas = of_type(events, "reasoning_deltas")
        assert "".join(d["delta"] for d in deltas) == (
            "The user wants cats. I should look it up.Now I can answer."
        )
        rows = of_type(events, "reasoning")
        assert [(r["round"], r["text"]) for r in rows] == [
            (0, "The user wants cats. I should look it up."),
            (1, "Now I can answer."),
        ]
        first, second = fake_provider.requests
        assert first.body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
        assistant = second.body["messages"][1]
        assert assistant["role"] == "assistant"
        assert assistant["content"][0] == {
            "type": "thinking",
            "thinking": "The user wants cats. I should look it up.",
            "signature": "sig-1",
        }
        assert assistant["content"][1]["type"] == "tool_use"
        # the run is over: compaction removes the streamed partials, the rows stay
        report = await rt.compact("/a/x")
        assert report.text_deltas >= len(deltas)
        events, _ = await rt.read("/a/x", limit=10_000)
        assert of_type(events, "reasoning_deltas") == [] == of_type(events, "text_deltas")
        assert len(of_type(events, "reasoning")) == 2


async def test_openai_compatible_reasoning_deltas_are_recorded(
    fake_provider: FakeProvider, store_url: str
) -> None:
    model = OpenAIModel(
        "gpt-fake", api_key="k", base_url=fake_provider.openai_base_url, max_retries=0
    )
    fake_provider.script(FakeTurn(reasoning=["Two ", "plus ", "two."], text="4"))
    async with Runtime(agent_registry(model), store_url) as rt:
        await rt.spawn("/a/x")
        await rt.send("/a/x", {"text": "2+2?"})
        await rt.run_until_idle()
        events, _ = await rt.read("/a/x", limit=10_000)
    assert [d["delta"] for d in of_type(events, "reasoning_deltas")] == ["Two ", "plus ", "two."]
    assert [r["text"] for r in of_type(events, "reasoning")] == ["Two plus two."]
    assert [t["value"] for t in of_type(events, "texts")] == ["4"]


async def test_a_model_without_reasoning_writes_none(
    fake_provider: FakeProvider, store_url: str
) -> None:
    model = AnthropicModel(
        "claude-fake", api_key="k", base_url=fake_provider.anthropic_base_url, max_retries=0
    )
    fake_provider.script(FakeTurn(text="plain"))
    async with Runtime(agent_registry(model), store_url) as rt:
        await rt.spawn("/a/x")
        await rt.send("/a/x", {"text": "hi"})
        await rt.run_until_idle()
        events, _ = await rt.read("/a/x", limit=10_000)
    assert of_type(events, "reasoning") == of_type(events, "reasoning_deltas") == []
    assert "thinking" not in fake_provider.requests[0].body
