"""Per-provider rate limits on model calls (``limit_models``, ``ENTITIES_MODEL_LIMIT_*``): a call
over a limit waits for its turn instead of failing. Driven through the official SDK against the
fake provider server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator

import anyio
import pytest

from entities import DefinitionError, HandlerContext, Registry, Runtime, WakeEvent
from entities.agent import ModelLimit, limit_models
from entities.agent._anthropic import AnthropicModel
from entities.agent._limits import _from_env, _Gate, model_limits
from tests.entities._fake_providers import FakeProvider, FakeTurn
from tests.entities._fake_providers import fake_provider as fake_provider


@pytest.fixture(autouse=True)
def _no_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("ENTITIES_MODEL_LIMIT_ANTHROPIC", raising=False)
    limit_models("anthropic")
    yield
    limit_models("anthropic")


@pytest.mark.parametrize(
    "options", [{"per_minute": 0}, {"concurrent": -1}, {"concurrent": True}, {"per_minute": 1.5}]
)
def test_bad_limits_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(DefinitionError, match="whole number"):
        limit_models("anthropic", **options)  # type: ignore[arg-type]


def test_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENTITIES_MODEL_LIMIT_OPENAI", "per_minute=50, concurrent=4")
    gate = _from_env("openai")
    assert gate is not None and gate.limit == ModelLimit(per_minute=50, concurrent=4)
    monkeypatch.setenv("ENTITIES_MODEL_LIMIT_OPENAI", "rpm=5")
    with pytest.raises(DefinitionError, match="ENTITIES_MODEL_LIMIT_OPENAI"):
        _from_env("openai")
    monkeypatch.delenv("ENTITIES_MODEL_LIMIT_OPENAI")
    assert _from_env("openai") is None


def test_per_minute_turns_wait_for_the_oldest_to_age() -> None:
    gate = _Gate(ModelLimit(per_minute=2))
    assert gate.try_enter() == 0 and gate.try_enter() == 0
    wait = gate.try_enter()
    assert 59 < wait <= 60  # the third waits until the first is a minute old
    gate.started[0] -= 60  # a minute later
    assert gate.try_enter() == 0


async def test_a_call_over_the_concurrent_limit_waits_for_its_turn(
    fake_provider: FakeProvider, store_url: str
) -> None:
    limit_models("anthropic", concurrent=1)
    resume = threading.Event()
    fake_provider.script(
        FakeTurn(text="first answer", pause_after=3, resume=resume),
        FakeTurn(text="second answer"),
    )
    model = AnthropicModel(
        "claude-fake", api_key="k", base_url=fake_provider.anthropic_base_url, max_retries=0
    )
    registry = Registry()

    @registry.define("a")
    async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.use_agent("sys", model=model)
            await ctx.agent.run()

    waits_before = model_limits.waits
    async with Runtime(registry, store_url) as rt:
        stop = anyio.Event()
        task = asyncio.create_task(rt.worker(poll_interval=0.05, concurrency=2).run(stop))
        try:
            await rt.spawn("/a/x")
            await rt.spawn("/a/y")
            one = await rt.send("/a/x", {"text": "hi"})
            two = await rt.send("/a/y", {"text": "hi"})

            async def held() -> bool:  # the first call streams (held); the second waits
                return model_limits.waits > waits_before and fake_provider.count >= 1

            await until(held)
            await anyio.sleep(0.2)
            assert fake_provider.count == 1  # ... and has not reached the provider
            resume.set()

            async def answered() -> bool:
                return bool(await rt.replies("/a/x", one.key) and await rt.replies("/a/y", two.key))

            await until(answered)
            answers = [*await rt.replies("/a/x", one.key), *await rt.replies("/a/y", two.key)]
        finally:
            resume.set()
            stop.set()
            await task
    assert fake_provider.count == 2
    assert sorted(answers) == ["first answer", "second answer"]


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 20) -> None:
    """Poll ``check`` until it is true (failing after ``seconds``)."""
    with anyio.fail_after(seconds):
        while True:
            if await check():
                return
            await anyio.sleep(0.02)
