"""How a running Worker shares its lanes: an entity whose inbox refills while its wake runs
takes its next wake right away on the same lane (no trip through the dispatch loop), but only
while lanes are free, so a busy entity never starves the others. On every store backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities._worker import FOLLOW_ON, Worker

registry = Registry()
handled: dict[str, int] = {}
# (condition on ``handled``, event): each handler sets the events whose condition holds
watchers: list[tuple[Callable[[], bool], anyio.Event]] = []


def _count(url: str) -> None:
    handled[url] = handled.get(url, 0) + 1
    for condition, event in watchers:
        if condition():
            event.set()


@registry.define("looper", description="sends itself a message on every wake, up to a limit")
async def looper(ctx: HandlerContext, wake: WakeEvent) -> None:
    _count(ctx.entity_url)
    for message in wake.messages:
        if message.payload["left"] > 0:
            await ctx.send(ctx.entity_url, {"left": message.payload["left"] - 1})


@registry.define("one", description="counts its wakes")
async def one(ctx: HandlerContext, wake: WakeEvent) -> None:
    _count(ctx.entity_url)


slow_started: list[anyio.Event] = []
slow_attempts: list[int] = []


@registry.define("slow", description="takes far longer than the test waits, the first time")
async def slow(ctx: HandlerContext, wake: WakeEvent) -> None:
    slow_attempts.append(len(slow_attempts) + 1)
    _count(ctx.entity_url)
    if len(slow_attempts) == 1:
        slow_started[0].set()
        await anyio.sleep(60)


class CountingWorker(Worker):
    """Counts how often the dispatch loop hands an entity to a lane."""

    dispatched: dict[str, int]

    async def _process(
        self, url: str, token: bytes | None, stolen: bool = False, lane: object | None = None
    ) -> None:
        self.dispatched[url] = self.dispatched.get(url, 0) + 1
        await super()._process(url, token, stolen, lane)


async def _run(rt: Runtime, worker: Worker, done: anyio.Event) -> None:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run, stop)
        with anyio.fail_after(20):
            await done.wait()
        stop.set()


@pytest.fixture(autouse=True)
def _reset() -> None:
    handled.clear()
    watchers.clear()


async def test_a_refilled_inbox_is_taken_on_the_same_lane(store_url: str) -> None:
    async with Runtime(registry, store_url) as rt:
        await rt.spawn("/looper/a", initial_message={"left": 40})
        worker = CountingWorker(rt, concurrency=4)
        worker.dispatched = {}
        done = anyio.Event()
        watchers.append((lambda: handled.get("/looper/a", 0) >= 41, done))
        await _run(rt, worker, done)
        assert handled["/looper/a"] == 41  # one wake per message: each send follows a commit
        assert worker.claims["won"] == 41 and not worker.claims["lost"]  # alone: no contention
        # up to FOLLOW_ON wakes per dispatch: far fewer dispatches than wakes
        assert worker.dispatched["/looper/a"] <= -(-41 // FOLLOW_ON) + 2


async def test_a_busy_entity_does_not_starve_the_others(store_url: str) -> None:
    async with Runtime(registry, store_url) as rt:
        await rt.spawn("/looper/busy", initial_message={"left": 1_000_000})
        await rt.spawn("/looper/busy2", initial_message={"left": 1_000_000})
        others = [f"/one/o{i}" for i in range(20)]
        for url in others:
            await rt.spawn(url, initial_message={})
        # two lanes, both taken by endless loopers whenever they can: the others must get in
        worker = Worker(rt, concurrency=2)
        done = anyio.Event()
        watchers.append((lambda: all(handled.get(url) for url in others), done))
        await _run(rt, worker, done)
        assert all(handled[url] == 1 for url in others)


async def test_a_cancelled_wake_gives_its_lease_back(store_url: str) -> None:
    """Ctrl-C (or a timeout, or the end of a drain) cancels a wake mid-handler: its lease is
    released at once, keeping its range, so the next worker runs it now (as attempt 2), not
    after the 30 s lease expires."""
    slow_started[:] = [anyio.Event()]
    slow_attempts.clear()
    async with Runtime(registry, store_url, lease_seconds=30) as rt:
        await rt.spawn("/slow/s", initial_message={"go": 1})
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(Worker(rt).run, anyio.Event())
                await slow_started[0].wait()
                tg.cancel_scope.cancel()
        found = await rt.record("/slow/s")
        assert found is not None
        record, _raw = found
        assert record.owner is None and record.lease_expires == 0.0
        assert record.inflight is not None and record.inflight.attempt == 1  # range kept
        done = anyio.Event()
        watchers.append((lambda: handled.get("/slow/s", 0) >= 2, done))
        with anyio.fail_after(5):  # well before the lease would have expired
            await _run(rt, Worker(rt), done)
        assert slow_attempts == [1, 2]
        found = await rt.record("/slow/s")
        assert found is not None and found[0].inflight is None and found[0].owner is None


async def test_a_worker_claims_only_the_types_its_registry_defines(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/shared.db"
    ours, theirs = Registry(), Registry()
    seen: list[str] = []

    @ours.define("mine")
    async def mine(ctx: HandlerContext, wake: WakeEvent) -> None:
        seen.append(ctx.entity_url)

    @theirs.define("other")
    async def other(ctx: HandlerContext, wake: WakeEvent) -> None:
        seen.append(ctx.entity_url)

    async with Runtime(theirs, db) as them:
        await them.spawn("/other/o1", initial_message="for the other app")
    async with Runtime(ours, db) as us:
        await us.spawn("/mine/m1", initial_message="for us")
        assert await us.run_until_idle() == 1  # the other app's entity is not ours to run
        record = await us.get("/other/o1")
        # to this app's code the other's entity is an orphan: kept, queued, not run here
        assert (record.status, record.runs, record.pending) == ("orphaned", 0, True)
    async with Runtime(theirs, db) as them:
        assert await them.run_until_idle() == 1
    assert seen == ["/mine/m1", "/other/o1"]
