"""A test agent written with the real ``agentproc`` SDK; works with 0.4.2 (wire 0.1) and 0.20.0
(wire 0.4). The message picks the behaviour (the profiles of seeds.md §2.2):

``hello`` (anything else): two partials, then ``echo: <msg>`` and a session id (the previous one
when given, else ``sess-123``); ``whoami``: replies with the previous session id and returns a
new one; ``fail-protocol``: ``ProtocolError``; ``fail-send-error``: ``send_error`` then a body;
``fail-crash``: an uncaught exception; ``none``: one partial and no result; ``slow``: sleeps past
any test timeout; ``stubborn``: ignores SIGTERM and sleeps; ``long``: a 100-character reply;
``gated``: one partial, then waits until the file ``TEST_AGENT_GATE_FILE`` exists.

If ``TEST_AGENT_COUNT_FILE`` is set, every run appends the message to that file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

from agentproc import (  # type: ignore[import-not-found]
    AgentResult,
    ProtocolError,
    create_profile,
)


def _attachments(ctx: Any) -> list[dict[str, Any]]:
    found = []
    for item in ctx.attachments:
        if isinstance(item, dict):  # 0.20.0: the turn's list as sent
            found.append({"type": item.get("type"), "url": item.get("url")})
        else:  # 0.4.2: Attachment objects parsed from AGENT_ATTACHMENTS
            found.append({"type": item.type, "url": item.url})
    return found


def _count(message: str) -> None:
    count_file = os.environ.get("TEST_AGENT_COUNT_FILE")
    if count_file:
        with open(count_file, "a", encoding="utf-8") as out:
            out.write(message + "\n")


def _gate_open() -> bool:
    return os.path.exists(os.environ["TEST_AGENT_GATE_FILE"])


async def handler(ctx: Any) -> Any:
    _count(ctx.message)
    message = ctx.message
    if message == "fail-protocol":
        raise ProtocolError("bad input")
    if message == "fail-send-error":
        await ctx.send_error("rate limited; retry in 60s")
        return "this body should be discarded"
    if message == "fail-crash":
        sys.stderr.write("loading the model...\n")
        raise RuntimeError("boom")
    if message == "none":
        await ctx.send_partial("only partial")
        return None
    if message == "slow":
        await asyncio.sleep(60)
        return "too late"
    if message == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        await asyncio.sleep(60)
        return "too late"
    if message == "gated":  # one partial, then wait for the test to create the gate file
        await ctx.send_partial("working")
        while not _gate_open():  # noqa: ASYNC110 (a file is the test's only signal)
            await asyncio.sleep(0.02)
        return "done"
    if message == "long":
        return "x" * 100
    if message == "whoami":
        previous = ctx.session_id or "none"
        return AgentResult(response=f"previous session: {previous}", session_id=previous + "+1")
    await ctx.send_partial("Hel")
    await ctx.send_partial('lo "quoted"\nnewline ünï')
    body = f"echo: {message}\nsecond line"
    attachments = _attachments(ctx)
    if attachments:
        body += "\nattachments: " + json.dumps(attachments)
    return AgentResult(response=body, session_id=ctx.session_id or "sess-123")


create_profile(handler)
