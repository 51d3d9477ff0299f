"""Property: any interleaving of sends to many counters, processed by competing workers, gives
exactly the sums a sequential model predicts (each message applied once), on every store
backend (each example on a fresh store)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import anyio
import anyio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entities import Runtime
from examples.counter import registry
from streams import open_store
from tests._stores import drop_store, make_store_url

sends = st.lists(
    st.tuples(st.integers(0, 5), st.integers(-50, 50), st.booleans()), min_size=1, max_size=40
)


async def _scenario(url: str, plan: list[tuple[int, int, bool]]) -> None:
    expected: dict[int, int] = {}
    async with open_store(url) as store_a, open_store(url) as store_b:
        # two runtimes (as two processes would be) compete for the same entities
        shared = url.startswith("memory")  # two memory stores would be two separate worlds
        a = Runtime(registry, store_a, worker_id="a")
        b = Runtime(registry, store_a if shared else store_b, worker_id="b")
        for i in range(6):
            await a.spawn(f"/counter/c{i}")
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.worker(concurrency=3, poll_interval=0.05).run, stop)
            tg.start_soon(b.worker(concurrency=2, poll_interval=0.05).run, stop)
            for entity, value, pause in plan:
                await (a if value % 2 else b).send(f"/counter/c{entity}", {"add": value})
                expected[entity] = expected.get(entity, 0) + value
                if pause:
                    await anyio.lowlevel.checkpoint()
            with anyio.fail_after(20):
                while await store_a.kv_scan("pending"):
                    await store_a.wait_signal("kv:pending", 0.05)
            stop.set()
        for i in range(6):
            state = await a.state_of(f"/counter/c{i}")
            total = state["totals"].get("total", {"value": 0})["value"]
            assert total == expected.get(i, 0), (i, total, expected)
            events, _ = await a.read(f"/counter/c{i}")
            inbox = [e["key"] for e in events if e["type"] == "inbox"]
            answered = [e["value"]["in_reply_to"] for e in events if e["type"] == "texts"]
            assert sorted(inbox) == sorted(answered)  # every message answered exactly once


EXAMPLES = {"memory": 15, "sqlite": 8, "postgres": 8}  # examples per backend


def test_random_interleavings_match_the_sequential_sums(backend: str) -> None:
    @settings(
        max_examples=EXAMPLES.get(backend, 8),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(plan=sends)
    def check(plan: list[tuple[int, int, bool]]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            url = make_store_url(backend, Path(tmp))
            try:
                asyncio.run(_scenario(url, plan))
            finally:
                asyncio.run(drop_store(url))

    check()
