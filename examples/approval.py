"""An agent whose ``delete_file(path)`` tool needs a person's approval.

With ``ENTITIES_MODEL`` unset it uses a scripted test model: asked "delete notes.txt" it calls
``delete_file``; the run then waits, durably and holding no worker, for a decision. Approved,
the tool runs and the agent replies "deleted notes.txt"; denied, it replies that the file was
not deleted because the deletion was not approved. The tool only pretends: it deletes nothing.

    entities serve examples.approval:registry
    entities spawn /approval/a1
    entities send /approval/a1 "delete notes.txt"
    entities approvals /approval/a1              # the pending call, with its id
    entities approve /approval/a1 ID             # or: entities deny /approval/a1 ID --note no
"""

from __future__ import annotations

import os
import re
from typing import Any

from entities import HandlerContext, Registry, WakeEvent
from entities.agent import ModelResponse, ScriptRequest, ToolCall, tool


@tool(requires_approval=True)
def delete_file(path: str) -> str:
    """Delete the file at ``path`` (a person approves each call first)."""
    return f"deleted {path}"  # a demonstration: nothing is deleted


def scripted(request: ScriptRequest) -> Any:
    """The test model: call ``delete_file`` when asked to delete, then report the outcome."""
    results = request.tool_results
    if results:
        result = results[-1]
        if result.is_error:
            return f"I did not delete the file: {result.content}."
        return f"Done: {result.content}."
    match = re.search(r"delete\s+(\S+)", request.last_user_text)
    if match:
        path = match.group(1).rstrip(".")
        return ModelResponse(tool_calls=(ToolCall("call_delete", "delete_file", {"path": path}),))
    return "I can delete files for you, once a person approves: ask me to 'delete notes.txt'."


registry = Registry()


@registry.define("approval", description="An agent whose file deletions need approval")
async def approval_agent(ctx: HandlerContext, wake: WakeEvent) -> None:
    if not wake.messages:
        return
    model = os.environ.get("ENTITIES_MODEL")
    ctx.use_agent(
        system_prompt="You manage files. Deleting a file needs a person's approval.",
        model=model or "test:scripted",
        tools=[delete_file],
        test_responses=None if model else scripted,
        max_rounds=4,
    )
    result = await ctx.agent.run()
    if not result.success:
        ctx.reply(f"Sorry, I could not answer: {result.error}")
