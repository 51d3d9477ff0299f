"""An assistant with one tool, ``add(a, b)``.

With ``ENTITIES_MODEL`` unset it uses a scripted test model: asked "what is 2+3" it calls
``add`` and answers with the tool's result. With ``ENTITIES_MODEL=anthropic:claude-sonnet-4-5``
(or ``openai:gpt-4.1-mini``) and the provider's API key in the environment it uses the real
provider through its official SDK.

    entities run examples/assistant.py:registry /assistant/a1 "what is 2+3"
    entities replay /assistant/a1
"""

from __future__ import annotations

import os
import re
from typing import Any

from entities import HandlerContext, Registry, WakeEvent
from entities.agent import ModelResponse, ScriptRequest, ToolCall, tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    return a + b


def scripted(request: ScriptRequest) -> Any:
    """The test model: use ``add`` for "what is X+Y", then answer with its result."""
    results = request.tool_results
    if results:
        return f"The answer is {results[-1].content}."
    match = re.search(r"(-?\d+)\s*\+\s*(-?\d+)", request.last_user_text)
    if match:
        a, b = int(match.group(1)), int(match.group(2))
        return ModelResponse(tool_calls=(ToolCall("call_add", "add", {"a": a, "b": b}),))
    return "I can add numbers: ask me something like 'what is 2+3'."


registry = Registry()


@registry.define("assistant", description="A helpful assistant that can add")
async def assistant(ctx: HandlerContext, wake: WakeEvent) -> None:
    if not wake.messages:
        return
    model = os.environ.get("ENTITIES_MODEL")
    ctx.use_agent(
        system_prompt="You are a helpful assistant. Use the add tool for arithmetic.",
        model=model or "test:scripted",
        tools=[add, *ctx.runtime_tools],
        test_responses=None if model else scripted,
        max_rounds=5,
    )
    result = await ctx.agent.run()
    if not result.success:
        ctx.reply(f"Sorry, I could not answer: {result.error}")
