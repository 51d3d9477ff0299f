"""A type capped at two concurrent wakes: each wake holds for a while and replies with when
it started and ended (wall clock, for the test to check that no three overlapped)."""

from __future__ import annotations

import time

import anyio

from entities import HandlerContext, Registry, WakeEvent

registry = Registry()


@registry.define("slow", max_concurrency=2)
async def slow(ctx: HandlerContext, wake: WakeEvent) -> None:
    if not wake.messages:
        return
    started = time.time()
    await anyio.sleep(0.25)
    ctx.reply({"start": started, "end": time.time()})
