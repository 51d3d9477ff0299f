"""Per-type concurrency caps (``max_concurrency``): at most N wakes of a type at once across
all workers, held by slot rows taken in each claim's own commit; a slot comes back when its
wake ends however it ends (committed, failed, killed, its worker died)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from entities import DefinitionError, HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities._pipeline.caps import CAP_NS
from tests import _postgres

from ._support import EntitiesProcess

registry = Registry()
active: dict[str, int] = {"now": 0, "most": 0}
release = {"event": anyio.Event()}


@pytest.fixture(autouse=True)
def _fresh() -> None:
    active.update(now=0, most=0)
    release["event"] = anyio.Event()


@registry.define("one", max_concurrency=1)
async def one(ctx: HandlerContext, wake: WakeEvent) -> None:
    if not wake.messages:
        return
    active["now"] += 1
    active["most"] = max(active["most"], active["now"])
    try:
        await release["event"].wait()
    finally:
        active["now"] -= 1
    ctx.reply("done")


@registry.define("free")
async def free(ctx: HandlerContext, wake: WakeEvent) -> None:
    if wake.messages:
        ctx.reply("free")


async def until(check: Callable[[], Any]) -> None:
    while True:
        found = check()
        if hasattr(found, "__await__"):
            found = await found
        if found:
            return
        await anyio.sleep(0.01)


def test_caps_are_checked_at_define() -> None:
    for bad in (0, -1, 1.5, True, 10_000):
        with pytest.raises(DefinitionError, match="max_concurrency"):
            Registry().define("x", handler=free, max_concurrency=bad)  # type: ignore[arg-type]
    assert (
        Registry().define("x", handler=free, max_concurrency=3).describe()["max_concurrency"] == 3
    )


async def test_one_wake_at_a_time_across_the_type(store_url: str) -> None:
    async with Runtime(registry, store_url) as rt:
        for i in range(4):
            await rt.spawn(f"/one/e{i}")
            await rt.send(f"/one/e{i}", {"go": i})
        await rt.spawn("/free/f")
        free_msg = await rt.send("/free/f", {"go": 1})
        stop = anyio.Event()
        task = asyncio.create_task(rt.worker(poll_interval=0.05, concurrency=8).run(stop))
        try:
            with anyio.fail_after(10):
                await until(lambda: active["now"] == 1)
                # another type is not held up by the cap
                await until(lambda: rt.replies("/free/f", free_msg.key))
            await anyio.sleep(0.3)  # several worker rounds: still one at a time
            assert active["now"] == 1
            slots = await rt.store.kv_scan(CAP_NS, "one|")
            assert len(slots) == 1
            release["event"].set()
            with anyio.fail_after(10):
                for url in [f"/one/e{i}" for i in range(4)]:
                    await until(partial(_replied, rt, url))
            assert active["most"] == 1
        finally:
            stop.set()
            await task


async def _replied(rt: Runtime, url: str) -> bool:
    events, _ = await rt.read(url, "-1")
    return any(e["type"] == "texts" for e in events)


async def test_a_slot_comes_back_when_its_holder_lease_expires(store_url: str) -> None:
    """A worker died holding a slot: once its lease expires another claim takes the slot."""
    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock, lease_seconds=30) as rt:
        await rt.spawn("/one/a")
        await rt.spawn("/one/b")
        await rt.run_until_idle()  # the creation wakes (no messages: nothing holds)
        await rt.send("/one/a", {"go": 1})
        await rt.send("/one/b", {"go": 2})
        dead = rt.worker()
        held = await dead.claim("/one/a")  # claimed, then the worker "dies": never run
        assert held is not None
        other = rt.worker()
        assert await other.claim("/one/b") is None  # the slot is held
        clock.advance(31)
        taken = await other.claim("/one/b")
        assert taken is not None
        assert await other.claim("/one/a") is None  # now b holds the one slot


def test_two_worker_processes_share_the_cap(tmp_path: Path) -> None:
    """Two ``entities worker`` processes on one PostgreSQL database: never more than two wakes
    of the capped type at once (each wake replies with when it ran)."""
    _postgres.check()
    db = _postgres.fresh_url()
    app = "tests.entities.apps.capped:registry"
    workers = [
        EntitiesProcess(
            ["worker", app, "--db", db, "--concurrency", "4", "--worker-id", f"w{i}"],
            log=tmp_path / f"worker{i}.log",
        )
        for i in range(2)
    ]

    async def scenario() -> list[dict[str, float]]:
        from tests.entities.apps.capped import registry as capped

        async with Runtime(capped, db) as rt:
            receipts = []
            for i in range(8):
                await rt.spawn(f"/slow/s{i}")
                receipts.append(await rt.send(f"/slow/s{i}", {"n": i}))
            for worker in workers:
                worker.start()
            spans: list[dict[str, float]] = []
            with anyio.fail_after(60):
                for receipt in receipts:
                    await until(partial(rt.replies, receipt.url, receipt.key))
                    spans.append((await rt.replies(receipt.url, receipt.key))[0])
            return spans

    try:
        spans = asyncio.run(scenario())
    finally:
        for worker in workers:
            worker.stop()
        asyncio.run(_postgres.drop_schema(db))
    edges = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most <= 2, spans
    assert most == 2  # the cap is used, not just respected
