"""Runtime overhead per model round of the agent loop, on SQLite, with the scripted test model.

    python benchmarks/agent_overhead.py [--quick]

Each run is one wake whose agent makes ``ROUNDS`` model calls (each asking for one trivial tool
call) and a final answer. A round's overhead is what the runtime adds around the model and the
tool: journaling the model response and the tool result (two fenced commits), streaming the text
deltas into the entity's stream, recording the tool call. The baseline, measured in the same run,
is the same scripted model and tool driven by a bare loop with no runtime at all; the overhead
per round is (runtime round time - baseline round time). Prints a table, then one JSON line with
``round_overhead_p50_ms`` and ``round_overhead_p99_ms``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.agent import ChatMessage, ModelResponse, ScriptedModel, ScriptRequest, ToolCall, tool

ROUNDS = 8


@tool
def noop(i: int) -> int:
    """Return its argument."""
    return i


def script(request: ScriptRequest) -> Any:
    if request.round < ROUNDS:
        return ModelResponse(
            text=f"round {request.round} ",
            tool_calls=(ToolCall(f"c{request.round}", "noop", {"i": request.round}),),
        )
    return "done"


registry = Registry()
durations: list[float] = []


@registry.define("bench")
async def bench(ctx: HandlerContext, wake: WakeEvent) -> None:
    if not wake.messages:
        return
    ctx.use_agent("sys", tools=[noop], test_responses=script, max_rounds=ROUNDS + 2, history=2)
    started = time.perf_counter()
    result = await ctx.agent.run()
    durations.append(time.perf_counter() - started)
    assert result.success and result.rounds == ROUNDS + 1


async def bare_loop() -> float:
    """The same model and tool with no runtime: the baseline."""
    model = ScriptedModel(script)
    messages = [ChatMessage(role="user", content="go")]
    started = time.perf_counter()
    deltas: list[str] = []

    async def on_text(delta: str) -> None:
        deltas.append(delta)

    for _ in range(ROUNDS + 1):
        response = await model.complete(system="sys", messages=messages, tools=[], on_text=on_text)
        messages.append(
            ChatMessage(role="assistant", content=response.text, tool_calls=response.tool_calls)
        )
        for call in response.tool_calls:
            result = await noop.call(call.arguments)
            messages.append(
                ChatMessage(role="tool", content=str(result.result), tool_call_id=call.id)
            )
    return time.perf_counter() - started


async def main(quick: bool) -> dict[str, Any]:
    runs = 40 if quick else 200
    baseline = [await bare_loop() for _ in range(runs)]
    with tempfile.TemporaryDirectory() as tmp:
        async with Runtime(registry, f"sqlite:///{tmp}/agent.db") as rt:
            for i in range(runs):
                await rt.spawn(f"/bench/b{i}")
            await rt.run_until_idle()
            for i in range(runs):
                await rt.send(f"/bench/b{i}", {"text": "go"})
                await rt.run_until_idle()
    base_round = statistics.median(baseline) / (ROUNDS + 1)
    overhead = sorted(max(0.0, d / (ROUNDS + 1) - base_round) * 1000 for d in durations)
    p99 = overhead[min(len(overhead) - 1, round(0.99 * (len(overhead) - 1)))]
    figures = {
        "runs": runs,
        "rounds_per_run": ROUNDS + 1,
        "baseline_round_ms": round(base_round * 1000, 4),
        "runtime_round_p50_ms": round(statistics.median(durations) / (ROUNDS + 1) * 1000, 4),
        "round_overhead_p50_ms": round(statistics.median(overhead), 4),
        "round_overhead_p99_ms": round(p99, 4),
    }
    print(f"{'measure':<24}{'value':>12}")
    for key, value in figures.items():
        print(f"{key:<24}{value:>12}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer runs (a few seconds)")
    print(json.dumps(anyio.run(main, parser.parse_args().quick)))
