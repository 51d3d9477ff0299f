"""Scale-out on PostgreSQL: wake throughput with 1, 2 and 4 worker processes, and the latency
from a send in one process to the handler in another.

    python benchmarks/scale_out.py [--quick] [--db postgresql://user@host:port/db]

The database is ``--db``, else ``ENTITIES_BENCH_POSTGRES_URL``, else ``ENTITIES_TEST_POSTGRES_URL``,
else ``postgresql://postgres@127.0.0.1:5432/test``; every measurement uses a fresh schema, dropped
afterwards.

- ``workers_1`` / ``workers_2`` / ``workers_4``: wakes per second. For each count, 1,000
  counters are spawned on a fresh schema and K worker processes (multiprocessing, each
  ``Runtime(...).worker().run(stop)`` on its own store, concurrency 64) are started. A round sends
  every counter N messages while no worker runs, releases the K workers together and times them
  until nothing is pending (a wake takes all of its entity's waiting messages, so a round is about
  one wake per counter). The counts take turns round by round (1, 2, 4, 1, 2, 4, ...), so they see
  the machine in the same state; wakes/s is the median round, and ``speedup_2`` / ``speedup_4``
  the median of the per-round ratios to the one-worker round run just before.
- ``p50_ms`` / ``p99_ms``: send-to-handler latency across processes: the benchmark process sends
  (wall clock taken just before ``Runtime.send``), one worker process runs the wake, and its
  handler replies with the wall clock at which it started (LISTEN/NOTIFY carries the wake-up).

Also printed: each round's worker CPU per wake (summed over the worker processes), PostgreSQL's
CPU per wake (all of this machine's ``postgres`` processes, from /proc; ``-`` for a remote
database), claim outcomes per wake, ``largest_share_2`` / ``largest_share_4``, the part of a
round's wakes its busiest worker ran (a round lasts as long as that worker), and
``cpu_parallelism_2`` / ``cpu_parallelism_4``, how many
pure-Python processes the machine runs in parallel at the time (2.0 on two idle cores), to read
the speed-ups against.
``SCALE_OUT_PROFILE=DIR`` writes a cProfile of every worker process into DIR.

Prints a table, then, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entities import HandlerContext, Registry, Runtime, WakeEvent, collection

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/test"
COUNTERS = 1000

registry = Registry()


class Total(BaseModel):
    key: str
    value: int = 0


@registry.define(
    "counter",
    description="adds; replies with the total and the wall clock at which the handler started",
    state={"totals": collection(Total, primary_key="key")},
)
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    started = time.time()
    totals = ctx.db.collections.totals
    current = totals.get("total")
    total = 0 if current is None else current.value
    for message in wake.messages:
        total += int(message.payload.get("add", 0))
        ctx.reply({"total": total, "started": started}, to=message)
    if wake.messages:
        row = Total(key="total", value=total)
        if current is None:
            ctx.db.actions.totals_insert(row=row)
        else:
            ctx.db.actions.totals_update(key="total", updater=row)


# -- worker processes ------------------------------------------------------------------------


def _worker_process(db: str, index: int, gate: Barrier, stop: Event, rounds: int, out: Any) -> None:
    """One worker process: open the store, then for each round wait at the barrier with the
    others and the benchmark, run wakes until told to pause, and report how many it ran."""
    profile_dir = os.environ.get("SCALE_OUT_PROFILE")
    if not profile_dir:
        anyio.run(_worker_main, db, index, gate, stop, rounds, out)
        return
    import cProfile

    with cProfile.Profile() as profile:  # a diagnostic: SCALE_OUT_PROFILE=DIR
        anyio.run(_worker_main, db, index, gate, stop, rounds, out)
    profile.dump_stats(str(Path(profile_dir) / f"worker-{os.getpid()}.prof"))


async def _worker_main(
    db: str, index: int, gate: Barrier, stop: Event, rounds: int, out: Any
) -> None:
    async with Runtime(registry, db, worker_id=f"bench-{index}", lease_seconds=30) as rt:
        worker = rt.worker()
        for _ in range(rounds):
            await anyio.to_thread.run_sync(gate.wait)  # ready: go together
            paused = anyio.Event()

            async def watch(paused: anyio.Event = paused) -> None:
                await anyio.to_thread.run_sync(stop.wait)
                paused.set()

            before, cpu = worker.wakes, time.process_time()
            worker.claims.clear()
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await worker.run(paused)
                tg.cancel_scope.cancel()
            out.put((worker.wakes - before, time.process_time() - cpu, dict(worker.claims)))
            await anyio.to_thread.run_sync(gate.wait)  # paused: the benchmark may reset


def _spin(loops: int) -> None:
    total = 0
    for i in range(loops):
        total += i * i


def postgres_cpu() -> float | None:
    """CPU seconds used so far by this machine's PostgreSQL processes (``None`` where /proc
    does not show them, e.g. a remote database). Read before and after a round."""
    total, found = 0, False
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if not stat[stat.index("(") + 1 : stat.rindex(")")].startswith("postgres"):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        found = True
    return total / os.sysconf("SC_CLK_TCK") if found else None


def cpu_parallelism(processes: int, loops: int = 3_000_000) -> float:
    """How many pure-Python processes this machine runs in parallel right now: ``processes``
    spinning together, relative to one alone (2.0 on two idle cores; less when other load
    competes). Read the wake speed-ups against this."""
    ctx = multiprocessing.get_context("fork")

    def run(count: int) -> float:
        procs = [ctx.Process(target=_spin, args=(loops,)) for _ in range(count)]
        start = time.perf_counter()
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        return time.perf_counter() - start

    alone = min(run(1) for _ in range(2))
    together = min(run(processes) for _ in range(2))
    return processes * alone / together


# -- helpers ----------------------------------------------------------------------------------


def fresh_url(base: str) -> str:
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in {"schema", "search_path"}]
    query.append(("schema", f"bench_{uuid.uuid4().hex[:16]}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def drop_schema(url: str) -> None:
    import asyncpg

    from streams._backends._postgres_schema import parse_url, quote_ident

    parsed = parse_url(url)
    conn = await asyncpg.connect(parsed.dsn, timeout=10)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(parsed.schema)} CASCADE")
    finally:
        await conn.close()


async def _bulk(calls: list[Any], width: int = 256) -> None:
    """Run the coroutine functions ``calls`` with at most ``width`` in flight."""
    limiter = anyio.Semaphore(width)

    async def one(call: Any) -> None:
        async with limiter:
            await call()

    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(one, call)


async def pending_count(rt: Runtime) -> int:
    from entities._records import PENDING_NS

    return len(await rt.store.kv_scan(PENDING_NS, limit=1))


async def wait_idle(rt: Runtime, interval: float = 0.01) -> None:
    """Return once no entity is pending (polled every ``interval`` seconds)."""
    while True:
        if not await pending_count(rt):
            return
        await anyio.sleep(interval)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- measurements -----------------------------------------------------------------------------


class Fleet:
    """``workers`` worker processes on a fresh schema with 1,000 spawned counters, run round by
    round (``rounds`` in all): each round sends every counter ``messages`` messages while the
    workers wait, releases them together and times them until nothing is pending."""

    def __init__(self, base: str, workers: int, messages: int, rounds: int) -> None:
        self.db = fresh_url(base)
        self.workers, self.messages = workers, messages
        ctx = multiprocessing.get_context("spawn")
        self.gate = ctx.Barrier(workers + 1, timeout=120)
        self.stop = ctx.Event()
        self.out = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker_process,
                args=(self.db, i, self.gate, self.stop, rounds, self.out),
                daemon=True,
            )
            for i in range(workers)
        ]
        self.urls = [f"/counter/c{i}" for i in range(COUNTERS)]
        self.rates: list[float] = []
        self.wakes: list[int] = []
        self.cpu_ms: list[float] = []  # worker CPU per wake, summed over the worker processes
        self.pg_ms: list[float] = []  # PostgreSQL CPU per wake (when it runs on this machine)
        self.claims: Counter[str] = Counter()
        # the busiest worker's part of a round's wakes (1/K is an even split of K workers; a
        # round lasts as long as its busiest worker)
        self.largest: list[float] = []

    async def start(self) -> None:
        async with Runtime(registry, self.db) as rt:  # creates the schema before the workers
            for proc in self.procs:
                proc.start()
            await _bulk([lambda u=u: rt.spawn(u) for u in self.urls])

    async def round(self) -> float:
        """One round; returns its wakes/s."""
        async with Runtime(registry, self.db) as rt:
            await _bulk(
                [
                    lambda u=u, m=m: rt.send(u, {"add": 1 + m})
                    for m in range(self.messages)
                    for u in self.urls
                ]
            )
            await anyio.to_thread.run_sync(self.gate.wait)  # everyone ready: go
            start, pg_before = time.perf_counter(), postgres_cpu()
            await wait_idle(rt)
            elapsed, pg_after = time.perf_counter() - start, postgres_cpu()
        self.stop.set()
        reports = [self.out.get(timeout=60) for _ in self.procs]
        wakes = sum(w for w, _, _ in reports)
        self.cpu_ms.append(1000 * sum(c for _, c, _ in reports) / max(1, wakes))
        if pg_before is not None and pg_after is not None:
            self.pg_ms.append(1000 * (pg_after - pg_before) / max(1, wakes))
        for _, _, outcomes in reports:
            self.claims.update(outcomes)
        self.largest.append(max(w for w, _, _ in reports) / max(1, wakes))
        await anyio.to_thread.run_sync(self.gate.wait)  # everyone paused
        self.stop.clear()
        self.rates.append(wakes / elapsed)
        self.wakes.append(wakes)
        return self.rates[-1]

    async def check(self) -> None:
        """Every message of every round was applied exactly once."""
        async with Runtime(registry, self.db) as rt:
            expected = len(self.rates) * sum(1 + m for m in range(self.messages))
            for url in (self.urls[0], self.urls[len(self.urls) // 2], self.urls[-1]):
                state = await rt.state_of(url)
                got = state["totals"].get("total", {"value": None})["value"]
                assert got == expected, (url, got, expected)

    async def close(self) -> None:
        """Stop the worker processes and drop the schema."""
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        await drop_schema(self.db)

    def summary(self) -> dict[str, Any]:
        total = max(1, sum(self.wakes))
        return {
            "workers": self.workers,
            "wakes_per_s": statistics.median(self.rates),
            "rounds": [round(r) for r in self.rates],
            "wakes": self.wakes,
            "worker_cpu_ms_per_wake": statistics.median(self.cpu_ms),
            "postgres_cpu_ms_per_wake": statistics.median(self.pg_ms) if self.pg_ms else None,
            # claim outcomes per wake run (won, lost to another worker, leased elsewhere, empty)
            "claims_per_wake": {k: round(v / total, 3) for k, v in self.claims.items()},
            "largest_share": statistics.median(self.largest),
        }


async def measure_throughput(
    base: str, counts: Sequence[int], messages: int, rounds: int
) -> dict[int, Fleet]:
    """One fleet per worker count, taking turns round by round (1, 2, 4 workers, then again),
    so every count sees the machine in the same state: the speed of this VM drifts by tens of
    percent from one minute to the next, and the speed-ups are the ratios of rounds run side by
    side."""
    fleets = {count: Fleet(base, count, messages, rounds) for count in counts}
    try:
        for fleet in fleets.values():
            await fleet.start()
        for _ in range(rounds):
            for fleet in fleets.values():
                await fleet.round()
        for fleet in fleets.values():
            await fleet.check()
    finally:
        for fleet in fleets.values():
            await fleet.close()
    return fleets


async def measure_latency(base: str, samples: int) -> list[float]:
    """Send-to-handler latency (ms) with the handler in another process."""
    db = fresh_url(base)
    ctx = multiprocessing.get_context("spawn")
    gate = ctx.Barrier(2, timeout=120)
    stop = ctx.Event()
    out = ctx.Queue()
    proc = ctx.Process(target=_worker_process, args=(db, 0, gate, stop, 1, out), daemon=True)
    latencies: list[float] = []
    try:
        async with Runtime(registry, db) as rt:
            proc.start()
            targets = [f"/counter/l{i}" for i in range(20)]
            for url in targets:
                await rt.spawn(url)
            await anyio.to_thread.run_sync(gate.wait)
            await wait_idle(rt)  # the spawns' first wakes
            for seq in range(samples + 20):
                url = targets[seq % len(targets)]
                sent = time.time()
                receipt = await rt.send(url, {"add": 1})
                stream = url.lstrip("/") + "/main"
                offset = receipt.offset
                deadline = time.monotonic() + 10
                replies: list[Any] = []
                while not replies:
                    assert time.monotonic() < deadline, "no reply within 10 s"
                    await rt.store.wait(stream, offset, 1.0)
                    replies = await rt.replies(url, receipt.key, after=receipt.offset)
                    offset = (await rt.store.head(stream)).next_offset
                if seq >= 20:  # the first 20 warm up
                    latencies.append((replies[0]["started"] - sent) * 1000)
                await anyio.sleep(0.002)
            stop.set()
            out.get(timeout=60)
            await anyio.to_thread.run_sync(gate.wait)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        await drop_schema(db)
    return latencies


def paired_ratios(fleets: dict[int, Fleet], count: int) -> list[float]:
    """Per round, (wakes/s with ``count`` workers) / (wakes/s with one): rounds run back to
    back."""
    return [n / one for n, one in zip(fleets[count].rates, fleets[1].rates, strict=True)]


async def main(base: str, quick: bool) -> dict[str, Any]:
    messages = 3 if quick else 10
    rounds = 3 if quick else 7
    samples = 200 if quick else 1000
    fleets = await measure_throughput(base, (1, 2, 4), messages, rounds)
    results = {count: fleet.summary() for count, fleet in fleets.items()}
    latencies = await measure_latency(base, samples)
    parallel = {k: cpu_parallelism(k) for k in (2, 4)}
    w1 = results[1]["wakes_per_s"]
    speedups = {count: statistics.median(paired_ratios(fleets, count)) for count in fleets}
    figures: dict[str, Any] = {
        "workers_1": round(w1),
        "workers_2": round(results[2]["wakes_per_s"]),
        "workers_4": round(results[4]["wakes_per_s"]),
        "speedup_2": round(speedups[2], 2),
        "speedup_4": round(speedups[4], 2),
        "speedup_2_each": [round(ratio, 2) for ratio in paired_ratios(fleets, 2)],
        "largest_share_2": round(results[2]["largest_share"], 3),
        "largest_share_4": round(results[4]["largest_share"], 3),
        "cpu_parallelism_2": round(parallel[2], 2),
        "cpu_parallelism_4": round(parallel[4], 2),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "counters": COUNTERS,
        "messages_per_counter_per_round": messages,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "worker_cpu_ms_per_wake_1": round(results[1]["worker_cpu_ms_per_wake"], 3),
        "postgres_cpu_ms_per_wake_1": None
        if results[1]["postgres_cpu_ms_per_wake"] is None
        else round(results[1]["postgres_cpu_ms_per_wake"], 3),
    }
    print(
        f"{'worker processes':<18}{'wakes/s':>10}{'speed-up':>10}{'CPU ms/wake':>13}"
        f"{'PG ms/wake':>12}{'busiest':>9}   rounds (wakes/s)"
    )
    for workers, result in results.items():
        cpu, pg = result["worker_cpu_ms_per_wake"], result["postgres_cpu_ms_per_wake"]
        print(
            f"{workers:<18}{result['wakes_per_s']:>10.0f}{speedups[workers]:>10.2f}{cpu:>13.3f}"
            f"{'-' if pg is None else f'{pg:.3f}':>12}{result['largest_share']:>9.3f}"
            f"   {result['rounds']}  claims per wake: {result['claims_per_wake']}"
        )
    print(
        "speed-up: the median of per-round ratios, rounds of each worker count taken in turn; "
        "wakes/s: the median round; busiest: the median part of a round's wakes run by its "
        "busiest worker (1/K is an even split)"
    )
    print(
        f"CPU parallelism available now (pure-Python processes vs one alone): "
        f"2 -> {parallel[2]:.2f}, 4 -> {parallel[4]:.2f}"
    )
    print(
        f"send-to-handler across processes: p50 {figures['p50_ms']} ms, "
        f"p99 {figures['p99_ms']} ms ({len(latencies)} samples)"
    )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run (well under a minute)")
    parser.add_argument("--db", default=None, help="PostgreSQL URL (a fresh schema is used)")
    options = parser.parse_args()
    base = (
        options.db
        or os.environ.get("ENTITIES_BENCH_POSTGRES_URL")
        or os.environ.get("ENTITIES_TEST_POSTGRES_URL")
        or DEFAULT_DB
    )
    print(json.dumps(anyio.run(main, base, options.quick)))
