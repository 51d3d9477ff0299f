"""Token budgets: per entity and per type per UTC day, enforced before each model call from the
usage rows in the store (so every worker sees every other's), validated at ``define``; token
usage in run rows and in ``/metrics``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from entities import (
    BudgetExceeded,
    DefinitionError,
    HandlerContext,
    Registry,
    Runtime,
    TokenBudget,
    WakeEvent,
)
from entities._budgets import TOKENS_NS, Budgets
from entities._metrics import metrics
from entities.agent import ChatMessage, ModelResponse, ToolSpec, Usage
from entities.server._prometheus import render


class FixedModel:
    """A model that answers ``ok`` and reports 60 input + 40 output tokens per call."""

    name = "fixed:m"

    def __init__(self) -> None:
        self.calls = 0

    async def complete(
        self,
        *,
        system: str,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec],
        temperature: float | None = None,
        max_tokens: int = 4096,
        on_text: Any = None,
    ) -> ModelResponse:
        self.calls += 1
        return ModelResponse(text=f"ok {self.calls}", usage=Usage(60, 40))


def make_registry(model: FixedModel, budget: TokenBudget) -> Registry:
    registry = Registry()

    @registry.define("a", token_budget=budget)
    async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.use_agent("sys", model=model)
            await ctx.agent.run()

    return registry


def agent_runs(state: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The agent's own run records (``{wake}.run1``), oldest first."""
    rows = [(k, v) for k, v in state.get("runs", {}).items() if ".run" in k]
    return [v for _, v in sorted(rows, key=lambda kv: kv[1]["started_at"])]


@pytest.mark.parametrize(
    "budget",
    [
        TokenBudget(),
        TokenBudget(per_entity=0),
        TokenBudget(per_type=-5),
        TokenBudget(per_entity=True),
        TokenBudget(per_entity=1.5),  # type: ignore[arg-type]
        {"per_entity": 10},
        100,
    ],
)
def test_bad_budgets_are_refused_at_define(budget: Any) -> None:
    registry = Registry()
    with pytest.raises(DefinitionError, match="token_budget"):
        registry.define("a", handler=lambda ctx, wake: None, token_budget=budget)
    assert "a" not in registry


def test_a_budget_is_described() -> None:
    registry = make_registry(FixedModel(), TokenBudget(per_entity=100))
    assert registry.get("a").describe()["token_budget"] == {"per_entity": 100, "per_type": None}


async def test_an_entity_past_its_budget_fails_its_run_without_calling_the_model(
    shared_store_url: str,
) -> None:
    model = FixedModel()
    registry = make_registry(model, TokenBudget(per_entity=150))
    refused_before = metrics.budget_refusals.counters.get(("a",), 0)
    async with Runtime(registry, shared_store_url) as rt:
        await rt.spawn("/a/x")
        for n in range(3):
            await rt.send("/a/x", {"text": f"hi {n}"})
            await rt.run_until_idle()
        assert model.calls == 2  # 0 then 100 tokens used: called; 200 >= 150: not called
        state = await rt.view("/a/x")
        runs = agent_runs(state)
        assert [(r["status"], r["finish_reason"]) for r in runs] == [
            ("completed", "stop"),
            ("completed", "stop"),
            ("failed", "budget"),
        ]
        assert (runs[0]["input_tokens"], runs[0]["output_tokens"]) == (60, 40)
        assert "token budget used up: /a/x used 200 of its 150 tokens" in runs[2]["error"]
        assert "per entity" in runs[2]["error"]
        wake_rows = [v for k, v in state["runs"].items() if ".run" not in k and "wake_id" in v]
        assert sum(r.get("input_tokens", 0) for r in wake_rows) == 120
        assert sum(r.get("output_tokens", 0) for r in wake_rows) == 80
        rows = await rt.store.kv_scan(TOKENS_NS)
        assert len(rows) == 2 and all("|a|x|" in key for key, _ in rows)
        # another entity of the type has its own budget
        await rt.spawn("/a/y")
        await rt.send("/a/y", {"text": "hi"})
        await rt.run_until_idle()
        assert model.calls == 3
    assert metrics.budget_refusals.counters.get(("a",), 0) == refused_before + 1
    exported = render().decode()
    assert 'entities_budget_refusals_total{type="a"}' in exported
    assert 'entities_model_tokens_total{direction="input",provider="fixed",type="a"}' in exported


async def test_a_type_budget_holds_across_workers(shared_store_url: str) -> None:
    """Two runtimes on one store (each its own worker and usage cache): what one used counts
    for the other."""
    model = FixedModel()
    budget = TokenBudget(per_type=200)
    async with (
        Runtime(make_registry(model, budget), shared_store_url) as one,
        Runtime(make_registry(model, budget), shared_store_url) as two,
    ):
        for rt, id in ((one, "x"), (two, "y"), (one, "z"), (two, "w")):
            await rt.spawn(f"/a/{id}")
            await rt.send(f"/a/{id}", {"text": "hi"})
            await rt.run_until_idle()
        assert model.calls == 2  # x and y: 200 tokens of the type; z and w are refused
        for id in ("z", "w"):
            (run,) = agent_runs(await one.view(f"/a/{id}"))
            assert run["finish_reason"] == "budget"
            assert "type 'a' used 200 of its 200 tokens" in run["error"]


async def test_a_type_without_budget_writes_no_usage_rows(store_url: str) -> None:
    model = FixedModel()
    registry = Registry()

    @registry.define("free")
    async def free(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.use_agent("sys", model=model)
            await ctx.agent.run()

    async with Runtime(registry, store_url) as rt:
        await rt.spawn("/free/x")
        await rt.send("/free/x", {"text": "hi"})
        await rt.run_until_idle()
        assert model.calls == 1
        assert await rt.store.kv_scan(TOKENS_NS) == []
        (run,) = agent_runs(await rt.view("/free/x"))
        assert (run["input_tokens"], run["output_tokens"]) == (60, 40)


def test_budget_exceeded_is_an_entities_error() -> None:
    error = BudgetExceeded("used up", url="/a/x")
    assert (error.code, error.status, error.url) == ("BUDGET_EXCEEDED", 429, "/a/x")


async def test_usage_rows_of_days_before_yesterday_are_removed(store_url: str) -> None:
    registry = Registry()
    async with Runtime(registry, store_url) as rt:
        budgets = Budgets(rt.store)
        day = 86400.0
        start = 20_000 * day  # 2024-10-04 00:00 UTC
        await budgets.record("a", "x", "s1", 1, 1, start)
        await budgets.record("a", "x", "s2", 1, 1, start + day)
        assert len(await rt.store.kv_scan(TOKENS_NS)) == 2
        await budgets.record("a", "x", "s3", 1, 1, start + 2 * day)  # a new day: prune
        keys = [key for key, _ in await rt.store.kv_scan(TOKENS_NS)]
        assert keys == ["2024-10-05|a|x|s2", "2024-10-06|a|x|s3"]
        budget = TokenBudget(per_entity=2)
        assert await budgets.check(budget, "a", "x", start + 2 * day) is not None
        assert await budgets.check(budget, "a", "x", start + 3 * day) is None  # a new day
