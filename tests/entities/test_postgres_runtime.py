"""The entity runtime on PostgreSQL: two runtimes on two store objects (as two processes would
hold) with a running worker each share the counters; NOTIFY carries wake-ups between them."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import anyio
import pytest

from entities import Runtime
from examples.counter import registry
from streams import open_store
from tests import _postgres

pytestmark = _postgres.marks()


@pytest.fixture
async def url() -> AsyncIterator[str]:
    _postgres.check()
    fresh = _postgres.fresh_url()
    yield fresh
    await _postgres.drop_schema(fresh)


async def total_of(rt: Runtime, url: str) -> int:
    state = await rt.state_of(url)
    return int(state["totals"].get("total", {"value": 0})["value"])


async def test_many_sends_from_two_runtimes_sum_exactly(url: str) -> None:
    async with open_store(url) as store_a, open_store(url) as store_b:
        a = Runtime(registry, store_a, worker_id="a")
        b = Runtime(registry, store_b, worker_id="b")
        counters = [f"/counter/n{i}" for i in range(5)]
        for counter in counters:
            await a.spawn(counter)
        expected = dict.fromkeys(counters, 0)
        sends = []
        for n in range(300):
            counter = counters[n % len(counters)]
            expected[counter] += n
            sends.append(((a, b)[n % 2], counter, n))
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.worker(concurrency=4, poll_interval=1.0).run, stop)
            tg.start_soon(b.worker(concurrency=4, poll_interval=1.0).run, stop)
            await asyncio.gather(*(rt.send(c, {"add": v}) for rt, c, v in sends))
            with anyio.fail_after(30):
                while await store_a.kv_scan("pending"):
                    await store_a.wait_signal("kv:pending", 0.05)
            stop.set()
        for counter in counters:
            assert await total_of(b, counter) == expected[counter]
            events, _ = await a.read(counter)
            inbox = [e["key"] for e in events if e["type"] == "inbox"]
            answered = [e["value"]["in_reply_to"] for e in events if e["type"] == "texts"]
            assert len(inbox) == 60
            assert sorted(inbox) == sorted(answered)  # every message answered exactly once


async def test_a_send_via_one_store_wakes_the_worker_on_another_within_milliseconds(
    url: str,
) -> None:
    async with open_store(url) as store_a, open_store(url) as store_b:
        a = Runtime(registry, store_a, worker_id="a")
        b = Runtime(registry, store_b, worker_id="b")
        await b.spawn("/counter/live")
        stream = "counter/live/main"
        latencies = []
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            # the worker polls only every 10 s: a prompt wake can only come from NOTIFY
            tg.start_soon(a.worker(poll_interval=10.0).run, stop)
            await asyncio.sleep(0.2)
            for n in range(15):
                started = time.perf_counter()
                receipt = await b.send("/counter/live", {"add": n})
                offset = receipt.offset
                replied = False
                with anyio.fail_after(5):
                    while not replied:
                        await store_b.wait(stream, offset, 5)
                        events, offset = await b.read("/counter/live", offset)
                        replied = any(
                            e["type"] == "texts" and e["value"]["in_reply_to"] == receipt.key
                            for e in events
                        )
                latencies.append(time.perf_counter() - started)
            stop.set()
        # send committed via B -> NOTIFY -> A's worker wakes, runs and commits -> B sees the reply
        assert statistics.median(latencies[1:]) < 0.05, latencies


async def test_two_workers_each_run_their_own_share_of_the_entities(url: str) -> None:
    """Entity affinity on PostgreSQL: two workers learn of each other through NOTIFY and each
    runs the entities that prefer it (see tests/entities/test_affinity.py)."""
    from tests.entities import test_affinity as probes

    async with (
        Runtime(probes.registry, url, worker_id="a") as rt_a,
        Runtime(probes.registry, url, worker_id="b") as rt_b,
    ):
        worker_a, worker_b = rt_a.worker(), rt_b.worker()
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker_a.run, stop)
            tg.start_soon(worker_b.run, stop)
            with anyio.fail_after(10):  # both know of both
                while not worker_a.affinity.live == worker_b.affinity.live == ("a", "b"):
                    await anyio.sleep(0.01)
                    await worker_a.affinity.refresh(rt_a.clock.now())
                    await worker_b.affinity.refresh(rt_b.clock.now())
            urls = [f"/probe/s{i}" for i in range(60)]
            probes._expect(len(urls))
            for target in urls:
                await rt_a.spawn(target)
            with anyio.fail_after(20):
                await probes.all_ran.wait()
            stop.set()
        ran_on = {target: await probes.workers_of(rt_a, target) for target in urls}
    assert all(len(workers) == 1 for workers in ran_on.values()), ran_on
    assert {workers[0] for workers in ran_on.values()} == {"a", "b"}
    preferred = sum(
        1
        for target, workers in ran_on.items()
        if workers[0] == ("a" if worker_a.affinity.prefers(target) else "b")
    )
    # an entity runs elsewhere only after waiting STEAL_AFTER for its own worker: rare here
    assert preferred >= 0.9 * len(urls), ran_on
    assert worker_a.claims["lost"] + worker_b.claims["lost"] <= 3, (
        worker_a.claims,
        worker_b.claims,
    )
