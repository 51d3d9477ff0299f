"""OpenTelemetry traces with the SDK's in-memory exporter: a span per HTTP request, per wake
(linked to the span of the send that caused it), per model call, tool call and step; and,
without the extra, no spans, no trace context in messages and no middleware."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx2
import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities import _tracing as tracing
from entities.agent import tool
from entities.agent._anthropic import AnthropicModel
from entities.server import create_app
from tests._live import serving
from tests.entities._fake_providers import FakeProvider, FakeToolCall, FakeTurn
from tests.entities._fake_providers import fake_provider as fake_provider

registry = Registry()


@registry.define("tr-parent")
async def parent(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        await ctx.send("/tr-child/c", {"from parent": message.payload})


@registry.define("tr-child")
async def child(ctx: HandlerContext, wake: WakeEvent) -> None:
    return None


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracing.using(provider):
        yield memory


def named(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


async def test_a_wake_span_links_to_the_http_send_and_to_the_parent_wake(
    exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path}/t.db") as rt:
        await rt.spawn("/tr-parent/p")
        await rt.spawn("/tr-child/c")
        await rt.run_until_idle()
        exporter.clear()
        async with serving(create_app(rt)) as base, httpx2.AsyncClient(base_url=base) as client:
            answer = await client.post(
                "/_entities/entities/tr-parent/p/send", json={"payload": "hello"}
            )
            assert answer.status_code == 202
        await rt.run_until_idle()
        inbox = (await rt.store.read("tr-parent/p/main")).messages
        events = [orjson.loads(m.data) for m in inbox]
        (carried,) = [e["value"] for e in events if e["type"] == "inbox"]
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert "POST" in request.name
    assert carried["trace"]["traceparent"].split("-")[2] == f"{request.context.span_id:016x}"
    (parent_wake,) = named(spans, "wake tr-parent")
    assert parent_wake.kind == SpanKind.CONSUMER
    assert parent_wake.attributes is not None
    assert parent_wake.attributes["entities.url"] == "/tr-parent/p"
    assert [link.context.span_id for link in parent_wake.links] == [request.context.span_id]
    (child_wake,) = named(spans, "wake tr-child")
    assert [link.context.span_id for link in child_wake.links] == [parent_wake.context.span_id]


async def test_model_tool_and_step_spans_nest_in_the_wake(
    exporter: InMemorySpanExporter, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    agents = Registry()

    @tool
    async def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @agents.define("tr-agent")
    async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            model = AnthropicModel(
                "claude-test", api_key="k", base_url=fake_provider.anthropic_base_url
            )
            ctx.use_agent("sys", model, tools=[add])
            await ctx.agent.run()

    fake_provider.script(
        FakeTurn(tool_calls=[FakeToolCall("add", {"a": 1, "b": 2})]), FakeTurn(text="3")
    )
    async with Runtime(agents, f"sqlite:///{tmp_path}/a.db") as rt:
        await rt.spawn("/tr-agent/x", initial_message="1+2?")
        await rt.run_until_idle()
    spans = exporter.get_finished_spans()
    (wake,) = named(spans, "wake tr-agent")
    models = named(spans, "model call anthropic:claude-test")
    tools = named(spans, "tool call add")
    steps = named(spans, "step ")
    # steps: steering (before each round), model, tool, steering, model
    assert (
        len(models) == 2 and len(tools) == 1 and len(steps) == 3
    )  # the steering look before each round is no span
    by_id = {s.context.span_id: s for s in spans}
    for inner in [*models, *tools]:
        assert inner.parent is not None
        step = by_id[inner.parent.span_id]
        assert step.name.startswith("step ")
        assert step.parent is not None and step.parent.span_id == wake.context.span_id
    assert models[0].attributes is not None
    assert models[0].attributes["gen_ai.system"] == "anthropic"


def test_without_the_extra_nothing_is_traced(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc, anyio, orjson

        class NoOtel(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("no opentelemetry here")
                return None

        sys.meta_path.insert(0, NoOtel())
        from entities import _tracing
        from entities.server import create_app
        from entities import Registry, Runtime

        registry = Registry()

        @registry.define("tr-parent")
        async def parent(ctx, wake):
            for message in wake.messages:
                await ctx.send("/tr-child/c", {{"from parent": message.payload}})

        @registry.define("tr-child")
        async def child(ctx, wake):
            return None

        async def main():
            async with Runtime(registry, "sqlite:///{tmp_path}/n.db") as rt:
                await rt.spawn("/tr-parent/p", initial_message="x")
                await rt.spawn("/tr-child/c")
                await rt.run_until_idle()
                app = create_app(rt)
                names = [m.cls.__name__ for m in app.user_middleware]
                values = [orjson.loads(m.data).get("value") or {{}}
                          for m in (await rt.store.read("tr-child/c/main")).messages]
                print(_tracing._api() is None, _tracing.active(), names,
                      any("trace" in v for v in values if isinstance(v, dict)))

        anyio.run(main)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    ).stdout.strip()
    assert out == "True False ['_HeaderLimit', 'CrossSite', '_EndOnShutdown'] False"


def test_an_application_without_opentelemetry_does_not_load_it(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, anyio
        from entities import Registry, Runtime
        from entities.server import create_app

        registry = Registry()

        @registry.define("plain")
        async def plain(ctx, wake):
            return None

        async def main():
            async with Runtime(registry, "sqlite:///{tmp_path}/p.db") as rt:
                await rt.spawn("/plain/p", initial_message="x")
                await rt.run_until_idle()
                app = create_app(rt)
                print([m.cls.__name__ for m in app.user_middleware],
                      any(name.startswith("opentelemetry") for name in sys.modules))

        anyio.run(main)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    ).stdout.strip()
    assert out == "['_HeaderLimit', 'CrossSite', '_EndOnShutdown'] False"
