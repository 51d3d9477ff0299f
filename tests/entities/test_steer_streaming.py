"""Steering a run that is streaming from a model (the fake provider server, through the official
Anthropic and OpenAI SDKs): a ``mode="steer"`` message sent while the first model call is
mid-stream reaches the next model round as a user turn, and the final reply answers both the
original message and the steering one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.agent import ModelClient, tool
from entities.agent._anthropic import AnthropicModel
from entities.agent._openai import OpenAIModel
from tests.entities._fake_providers import FakeProvider, FakeToolCall, FakeTurn
from tests.entities._fake_providers import fake_provider as fake_provider

STEER = "only about their sleep"


@tool
def lookup(topic: str) -> str:
    """Look a topic up."""
    return f"facts about {topic}"


def model_for(provider: str, fake: FakeProvider) -> ModelClient:
    if provider == "anthropic":
        return AnthropicModel(
            "claude-fake", api_key="k", base_url=fake.anthropic_base_url, max_retries=0
        )
    return OpenAIModel("gpt-fake", api_key="k", base_url=fake.openai_base_url, max_retries=0)


def user_texts(provider: str, message: dict[str, Any]) -> list[str]:
    """The text parts of a user (or tool) message of the SDK's request."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    return [b["text"] for b in content or () if isinstance(b, dict) and b.get("type") == "text"]


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_a_steering_message_reaches_the_next_round_of_a_streaming_run(
    provider: str, fake_provider: FakeProvider, shared_store_url: str
) -> None:
    resume = threading.Event()
    fake_provider.script(
        FakeTurn(
            text="Let me look that up. ",
            tool_calls=(FakeToolCall("lookup", {"topic": "cats"}, id="t1"),),
            pause_after=4,  # mid-stream: some text is out, the tool call is not
            resume=resume,
        ),
        FakeTurn(text="Cats sleep 15 hours a day."),
    )
    model = model_for(provider, fake_provider)
    registry = Registry()

    @registry.define("a")
    async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.use_agent("Answer briefly.", model=model, tools=[lookup])
            await ctx.agent.run()

    async with Runtime(registry, shared_store_url) as rt:
        stop = anyio.Event()
        task = asyncio.create_task(rt.worker(poll_interval=0.05).run(stop))
        try:
            await rt.spawn("/a/x")
            first = await rt.send("/a/x", {"text": "tell me about cats"})

            async def streaming() -> bool:  # the first call is streaming: a delta is out
                events, _ = await rt.read("/a/x", limit=10_000)
                return any(e["type"] == "text_deltas" for e in events)

            await until(streaming)
            assert fake_provider.count == 1
            steer = await rt.send("/a/x", {"text": STEER}, mode="steer")
            resume.set()

            async def answered() -> bool:
                return (await rt.outcome("/a/x", steer.key)).status != "pending" and bool(
                    await rt.replies("/a/x", first.key)
                )

            await until(answered)
            answer = "Cats sleep 15 hours a day."
            assert await rt.replies("/a/x", first.key) == [answer]
            assert await rt.replies("/a/x", steer.key) == [answer]  # answered by the same run
        finally:
            resume.set()
            stop.set()
            await task
    assert fake_provider.count == 2  # no third call: the steering message needed no run of its own
    second = fake_provider.requests[1].body["messages"]
    # after the tool result, the steering text is the newest user turn
    assert STEER in user_texts(provider, second[-1])
    assert all(
        STEER not in user_texts(provider, m) for m in fake_provider.requests[0].body["messages"]
    )
    assert any("tell me about cats" in user_texts(provider, m) for m in second)


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 20) -> None:
    """Poll ``check`` until it is true (failing after ``seconds``)."""
    with anyio.fail_after(seconds):
        while True:
            if await check():
                return
            await anyio.sleep(0.02)
