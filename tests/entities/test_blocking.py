"""Handlers cannot freeze the worker: a plain ``def`` handler runs on a thread (its blocking
calls hold no other wake), and the watchdog names an ``async def`` handler that blocks the
loop. A real worker over SQLite."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from entities import HandlerContext, Registry, Runtime, WakeEvent

registry = Registry()
finished: dict[str, float] = {}


@registry.define("sync_sleeper")
def sync_sleeper(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        time.sleep(float(message.payload["seconds"]))
        finished[ctx.entity_url] = time.monotonic()
        ctx.reply("slept", to=message)


@registry.define("quick")
async def quick(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        finished[ctx.entity_url] = time.monotonic()
        ctx.reply("quick", to=message)


@registry.define("async_blocker")
async def async_blocker(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        time.sleep(float(message.payload["seconds"]))  # noqa: ASYNC251 (the mistake named)
        ctx.reply("blocked", to=message)


async def until(check: Callable[[], Any], seconds: float = 20.0) -> None:
    with anyio.fail_after(seconds):
        while True:
            if check():
                return
            await anyio.sleep(0.01)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    finished.clear()


async def test_a_sync_handler_that_sleeps_holds_no_other_wake(tmp_path: Path) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path / 'b.db'}") as rt:
        await rt.spawn("/sync_sleeper/s")
        await rt.spawn("/quick/q")
        await rt.run_until_idle()  # the spawns' own first wakes
        stop = anyio.Event()
        worker = rt.worker(poll_interval=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            sent = time.monotonic()
            slow = await rt.send("/sync_sleeper/s", {"seconds": 1.0})
            await anyio.sleep(0.1)  # the sleeper is running now
            fast = await rt.send("/quick/q", {})
            await until(lambda: "/quick/q" in finished)
            assert "/sync_sleeper/s" not in finished  # the quick one did not wait for it
            assert finished["/quick/q"] - sent < 0.8
            await until(lambda: "/sync_sleeper/s" in finished)
            assert finished["/sync_sleeper/s"] - sent >= 1.0
            stop.set()
        assert await rt.replies("/sync_sleeper/s", slow.key) == ["slept"]
        assert await rt.replies("/quick/q", fast.key) == ["quick"]


async def test_the_watchdog_names_a_handler_that_blocks_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="entities.worker")
    async with Runtime(registry, f"sqlite:///{tmp_path / 'b.db'}") as rt:
        await rt.spawn("/async_blocker/a")
        await rt.run_until_idle()
        stop = anyio.Event()
        worker = rt.worker(poll_interval=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            receipt = await rt.send("/async_blocker/a", {"seconds": 1.6})
            await until(lambda: worker.wakes >= 1)
            await anyio.sleep(0.3)  # the watchdog's thread logs the end of the episode
            stop.set()
        assert await rt.replies("/async_blocker/a", receipt.key) == ["blocked"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per episode
    message = warnings[0].getMessage()
    assert "the handler of /async_blocker/a has blocked the worker's event loop" in message
    assert "test_blocking.py" in message and "async_blocker" in message  # where it blocks
    assert worker.watchdog.episodes == 1
    assert any("runs again after" in r.getMessage() for r in caplog.records)


async def test_a_quick_handler_wakes_no_watchdog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path / 'b.db'}") as rt:
        await rt.spawn("/async_blocker/a")
        await rt.run_until_idle()
        stop = anyio.Event()
        worker = rt.worker(poll_interval=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            await rt.send("/async_blocker/a", {"seconds": 0.3})
            await until(lambda: worker.wakes >= 1)
            await anyio.sleep(0.6)
            stop.set()
    assert worker.watchdog.episodes == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

