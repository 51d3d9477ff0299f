"""Streamed model output is visible to a Durable Streams client (real SSE over uvicorn) while the
agent's run is still going, on every store backend."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import orjson

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.agent import ModelResponse, ScriptRequest, ToolCall, tool
from entities.server import create_app
from tests._live import serving

httpx2.alias_httpx()  # httpx_sse imports `httpx`; make that name resolve to httpx2
from httpx_sse import aconnect_sse  # noqa: E402


async def test_text_deltas_reach_an_sse_reader_before_the_run_ends(store_url: str) -> None:
    gate = anyio.Event()

    @tool
    async def wait_for_reader() -> str:
        """Blocks until the test has seen the streamed text."""
        await gate.wait()
        return "ok"

    def script(request: ScriptRequest) -> Any:
        if not request.tool_results:
            return ModelResponse(
                text="Thinking hard about it ", tool_calls=(ToolCall("w", "wait_for_reader", {}),)
            )
        return "Final answer"

    registry = Registry()

    @registry.define("a")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.use_agent("sys", tools=[wait_for_reader], test_responses=script)
            await ctx.agent.run()

    async with Runtime(registry, store_url) as rt, serving(create_app(rt)) as base:
        stop = anyio.Event()
        seen: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.worker(poll_interval=0.1).run, stop)
            await rt.spawn("/a/x", initial_message={"text": "go"})
            url = f"{base}/v1/stream/a/x/main"
            with anyio.fail_after(20):
                async with httpx2.AsyncClient(timeout=30) as client:
                    async with aconnect_sse(
                        client, "GET", url, params={"offset": "-1", "live": "sse"}
                    ) as source:
                        async for sse in source.aiter_sse():
                            if sse.event != "data":
                                continue
                            for item in orjson.loads(sse.data):
                                seen.append(item)
                                if item["type"] == "text_deltas" and not gate.is_set():
                                    # the run is blocked in its tool: nothing final yet
                                    assert not any(e["type"] == "texts" for e in seen)
                                    gate.set()
                            if any(e["type"] == "texts" for e in seen):
                                break
            stop.set()
    deltas = [e["value"]["delta"] for e in seen if e["type"] == "text_deltas"]
    assert "".join(deltas).startswith("Thinking hard about it Final answer")
    assert gate.is_set()
    assert [e["value"]["text"] for e in seen if e["type"] == "texts"] == ["Final answer"]
