"""A ``desk`` for request-response tests: ``{"ask": n}`` replies ``n`` (after ``sleep_ms``);
``{"hold": true}`` waits until :data:`GATE` opens, then replies ``"held"``;
``{"answer": key}`` replies ``"answered"`` to the message ``key``; ``{"fail": true}`` raises."""

from __future__ import annotations

import asyncio

from entities import HandlerContext, Registry, WakeEvent

registry = Registry()
GATE = asyncio.Event()  # a test sets its own (of its loop) and opens it


@registry.define(
    "desk", description="Answers asks; holds; answers earlier messages", max_attempts=1
)
async def desk(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        payload = message.payload if isinstance(message.payload, dict) else {}
        if payload.get("fail"):
            raise RuntimeError("asked to fail")
        if payload.get("hold"):
            await GATE.wait()
            ctx.reply("held", to=message)
        elif "answer" in payload:
            ctx.reply("answered", to=str(payload["answer"]))
        elif "ask" in payload:
            if payload.get("sleep_ms"):
                await asyncio.sleep(payload["sleep_ms"] / 1000)
            ctx.reply(payload["ask"], to=message)
