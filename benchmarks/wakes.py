"""Wake throughput, send-to-handler latency and idle memory of the entity runtime on SQLite.

    python benchmarks/wakes.py [--quick]

Prints a table, then one JSON line:

- ``wakes_per_s``: trivial handler, 1,000 entities, one worker process; the median of rounds of
  one message per entity, after a warm-up round;
- ``send_to_handler_p50_ms`` / ``send_to_handler_p99_ms``: in-process, SQLite, a running worker;
- ``idle_entity_bytes``: memory still held per dormant entity after 10,000 entities were woken
  once and went idle (the runtime's caches are bounded, so this falls towards 0 as entities
  grow);
- the baseline ``store_commits_per_s`` (bare two-op commits through the same store), measured
  in the same run, so ``wakes_per_commit_ratio`` shows what a wake costs relative to the
  physical write path.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from functools import partial
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entities import HandlerContext, Registry, Runtime, WakeEvent
from streams import KvPut, open_store

registry = Registry()
arrivals: dict[int, float] = {}
signals: dict[int, anyio.Event] = {}


@registry.define("bench", description="trivial handler")
async def bench(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        seq = message.payload.get("seq")
        if seq is not None:
            arrivals[seq] = time.perf_counter()
            if seq in signals:
                signals[seq].set()


async def _drain(rt: Runtime) -> int:
    return await rt.run_until_idle()


async def measure_baseline(db: str, n: int) -> float:
    async with open_store(db) as store:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(
                    store.commit, [KvPut("bench", f"k{i}", b"x"), KvPut("b2", f"k{i}", b"y")]
                )
        return n / (time.perf_counter() - start)


async def measure_wakes(db: str, entities: int, rounds: int) -> tuple[float, int]:
    async with Runtime(registry, db, concurrency=64) as rt:
        async with anyio.create_task_group() as tg:
            for i in range(entities):
                tg.start_soon(rt.spawn, f"/bench/e{i}")
        await _drain(rt)  # the first wakes (one per spawn) warm the caches; not measured
        total_wakes = 0
        rates: list[float] = []
        for _ in range(rounds):
            async with anyio.create_task_group() as tg:
                for i in range(entities):
                    tg.start_soon(rt.send, f"/bench/e{i}", {"n": 1})
            start = time.perf_counter()
            wakes = await _drain(rt)
            rates.append(wakes / (time.perf_counter() - start))
            total_wakes += wakes
        return statistics.median(rates), total_wakes


async def measure_latency(db: str, samples: int) -> list[float]:
    async with Runtime(registry, db) as rt:
        for i in range(20):
            await rt.spawn(f"/bench/l{i}")
        stop = anyio.Event()
        latencies: list[float] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.worker(poll_interval=1.0).run, stop)
            await anyio.sleep(0.05)
            for seq in range(samples):
                signals[seq] = anyio.Event()
                sent = time.perf_counter()
                await rt.send(f"/bench/l{seq % 20}", {"seq": seq})
                with anyio.fail_after(5):
                    await signals[seq].wait()
                latencies.append((arrivals[seq] - sent) * 1000)
                await anyio.sleep(0.002)
            stop.set()
        return latencies


async def measure_idle_memory(db: str, entities: int) -> float:
    async with Runtime(registry, db, concurrency=64) as rt:
        for i in range(200):  # warm up every code path and cache before the baseline
            await rt.spawn(f"/bench/w{i}", initial_message={"n": 1})
        await _drain(rt)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        batch = 500
        for start in range(0, entities, batch):
            async with anyio.create_task_group() as tg:
                for i in range(start, min(entities, start + batch)):
                    tg.start_soon(partial(rt.spawn, f"/bench/m{i}", initial_message={"n": 1}))
            await _drain(rt)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return max(0.0, (after - before) / entities)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main(quick: bool) -> dict[str, float]:
    entities = 1000
    rounds = 3 if quick else 7
    samples = 200 if quick else 1000
    idle = 2000 if quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        baseline = await measure_baseline(f"sqlite:///{tmp}/base.db", 5000 if quick else 20000)
        wakes_per_s, wakes = await measure_wakes(f"sqlite:///{tmp}/wakes.db", entities, rounds)
        latencies = await measure_latency(f"sqlite:///{tmp}/lat.db", samples)
        idle_bytes = await measure_idle_memory(f"sqlite:///{tmp}/idle.db", idle)
    result = {
        "store_commits_per_s": round(baseline),
        "wakes_per_s": round(wakes_per_s),
        "wakes_per_commit_ratio": round(wakes_per_s / baseline, 3),
        "wakes": wakes,
        "entities": entities,
        "send_to_handler_p50_ms": round(statistics.median(latencies), 3),
        "send_to_handler_p99_ms": round(percentile(latencies, 99), 3),
        "latency_samples": len(latencies),
        "idle_entities": idle,
        "idle_entity_bytes": round(idle_bytes, 1),
    }
    print(f"{'measure':<28}{'value':>14}")
    for key, value in result.items():
        print(f"{key:<28}{value:>14}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run (well under a minute)")
    figures = anyio.run(main, parser.parse_args().quick)
    print(json.dumps(figures))
