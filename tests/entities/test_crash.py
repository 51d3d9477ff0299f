"""``entities serve`` SIGKILLed repeatedly while it takes messages loses and doubles nothing.

Twenty counters get several hundred ``{"add": v}`` messages with distinct values over HTTP from
many concurrent senders while the server process is killed with SIGKILL at random moments and
restarted on the same SQLite file and port. A send answered ``202`` is *acknowledged*; a send
whose connection broke after the request went out is *unknown* (it may or may not have landed);
a refused connection is retried, since nothing was sent.

It runs twice: ``serve`` (HTTP and worker in the process that dies) and ``split`` (``serve
--no-worker`` stays up and an ``entities worker`` process, running the counter slowed by 30 ms,
is killed while it has a wake in flight).

After the last restart every counter must settle, and then, for every counter:

- every acknowledged message is in its inbox exactly once, every inbox message is one we sent
  (acknowledged or unknown), and no value appears twice;
- every inbox message has exactly one reply, and the replies are the running totals in inbox
  order (each message applied exactly once, in order, across crashes and redeliveries);
- the final ``totals.total.value`` is the sum of the inbox;
- in split mode, at least one wake was redelivered (the kills are timed to land mid-wake; in
  serve mode they land mid-wake only most of the time).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from entities import Runtime
from examples.counter import registry

from ._support import EntitiesProcess, free_port

pytestmark = pytest.mark.slow

COUNTERS = 20
PER_COUNTER = 25  # 500 sends in all
KILLS = 3
LEASE_SECONDS = "1.5"


@dataclass
class Ledger:
    acked: dict[int, str] = field(default_factory=dict)  # value -> message key
    unknown: set[int] = field(default_factory=set)
    refused: int = 0


@dataclass
class Deployment:
    """``serve`` alone (killed: HTTP and worker die together), or ``split``: ``serve
    --no-worker`` plus an ``entities worker`` process (killed: the worker only)."""

    server: EntitiesProcess
    worker: EntitiesProcess | None
    marks: Path | None = None  # split: the worker marks every wake it starts here

    @property
    def victim(self) -> EntitiesProcess:
        return self.worker or self.server

    async def until_a_wake_runs(self, http: httpx2.AsyncClient, seconds: float) -> None:
        """Return once the victim has a wake in flight (split: certain; serve: best effort,
        by polling for a running entity), or after ``seconds``."""
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            if self.marks is not None:
                if any(self.marks.glob(f"{self.victim.pid}.*")):
                    await asyncio.sleep(0.01)  # well inside the handler's 30 ms
                    return
            else:
                try:
                    running = await http.get("/_entities/entities", params={"status": "running"})
                except httpx2.TransportError:
                    return
                if running.json():
                    return
            await asyncio.sleep(0.001)

    def start(self) -> None:
        self.server.start()
        if self.worker is not None:
            self.worker.start()


SLOW_COUNTER = """
import asyncio
import os
import uuid
from pathlib import Path

from entities import Registry
from examples import counter

MARKS = Path(__file__).with_name("marks")
base = counter.registry.get("counter")
registry = Registry()


async def slow_counter(ctx, wake):
    (MARKS / f"{os.getpid()}.{uuid.uuid4().hex}").touch()  # this process runs a wake now
    await asyncio.sleep(0.03)  # widen the window in which a kill finds a wake in flight
    await base.handler(ctx, wake)


registry.define("counter", handler=slow_counter, state=base.state, inbox=base.inbox)
"""


@pytest.fixture(params=["serve", "split"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    port = free_port()
    app = "examples/counter.py:registry"
    marks = None
    if request.param == "split":  # the worker runs the example's handler, slowed down
        (tmp_path / "slow_counter.py").write_text(SLOW_COUNTER)
        app = f"{tmp_path / 'slow_counter.py'}:registry"
        marks = tmp_path / "marks"
        marks.mkdir()
    db = ("--db", f"sqlite:///{tmp_path / 'c.db'}", "--lease-seconds", LEASE_SECONDS)
    split = request.param == "split"
    server = EntitiesProcess(
        ["serve", app, *db, "--port", str(port), *(["--no-worker"] if split else [])],
        log=tmp_path / "serve.log",
        port=port,
    )
    worker = EntitiesProcess(["worker", app, *db], log=tmp_path / "worker.log") if split else None
    try:
        yield Deployment(server, worker, marks)
    finally:
        for process in (server, worker):
            if process is not None:
                process.kill()


async def _spawn_all(http: httpx2.AsyncClient) -> None:
    for n in range(COUNTERS):
        response = await http.put(f"/_entities/entities/counter/n{n}", json={})
        assert response.status_code == 201, response.text


async def _sender(http: httpx2.AsyncClient, n: int, values: list[int], ledger: Ledger) -> None:
    url = f"/_entities/entities/counter/n{n}/send"
    for value in values:
        while True:
            try:
                response = await http.post(url, json={"payload": {"add": value}})
            except httpx2.ConnectError:  # refused: nothing was sent, so sending again is safe
                ledger.refused += 1
                await asyncio.sleep(0.05)
                continue
            except httpx2.TransportError:  # the request may have been processed
                ledger.unknown.add(value)
                break
            if response.status_code == 202:
                ledger.acked[value] = response.json()["key"]
            else:
                raise AssertionError(f"send of {value} to n{n}: {response.status_code}")
            break


async def _killer(
    deployment: Deployment,
    http: httpx2.AsyncClient,
    rng: random.Random,
    ledger: Ledger,
    done: asyncio.Event,
) -> int:
    """SIGKILL the server KILLS times while sends are under way: each kill comes once a
    random number of further sends were acknowledged, plus a random few milliseconds."""
    total = COUNTERS * PER_COUNTER
    marks = sorted(rng.sample(range(total // 20, total * 3 // 4), KILLS))
    kills = 0
    for mark in marks:
        while len(ledger.acked) < mark:
            if done.is_set():
                return kills
            await asyncio.sleep(0.002)
        # split: wait for a wake for sure (the worker polls each second); serve: best effort
        await deployment.until_a_wake_runs(http, 5.0 if deployment.marks else rng.uniform(0.1, 0.5))
        deployment.victim.kill()
        kills += 1
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        await asyncio.to_thread(deployment.victim.start)
    return kills


async def _settle(http: httpx2.AsyncClient, seconds: float) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        listing: list[dict[str, Any]] = (await http.get("/_entities/entities")).json()
        busy = [e["url"] for e in listing if e["pending"] or e["status"] == "running"]
        if not busy:
            return listing
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still busy after {seconds} s: {busy}")
        await asyncio.sleep(0.1)


async def test_sigkill_loses_and_doubles_nothing(deployment: Deployment, tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    await asyncio.to_thread(deployment.start)
    base = f"http://127.0.0.1:{deployment.server.port}"
    values = list(range(1, COUNTERS * PER_COUNTER + 1))
    rng.shuffle(values)
    plan = {n: values[n * PER_COUNTER : (n + 1) * PER_COUNTER] for n in range(COUNTERS)}
    ledger = Ledger()
    limits = httpx2.Limits(max_connections=COUNTERS, max_keepalive_connections=COUNTERS)
    async with httpx2.AsyncClient(base_url=base, timeout=10, limits=limits) as http:
        await _spawn_all(http)
        done = asyncio.Event()
        killer = asyncio.create_task(_killer(deployment, http, rng, ledger, done))
        await asyncio.gather(*(_sender(http, n, plan[n], ledger) for n in range(COUNTERS)))
        done.set()
        kills = await killer
        listing = await _settle(http, seconds=30)
    assert len(listing) == COUNTERS
    context = (
        f"seed={seed} kills={kills} "
        f"acked={len(ledger.acked)} unknown={len(ledger.unknown)} refused={ledger.refused}"
    )
    assert kills == KILLS, context  # every kill landed while sends were under way
    assert len(ledger.acked) + len(ledger.unknown) == len(values), context
    assert len(ledger.acked) >= len(values) // 2, context

    deployment.server.kill()
    if deployment.worker is not None:
        deployment.worker.kill()
        assert not ledger.unknown, "the HTTP server never died, yet a send went unanswered"
    owner = {v: n for n, vs in plan.items() for v in vs}
    redelivered = 0
    async with Runtime(registry, f"sqlite:///{tmp_path / 'c.db'}") as rt:
        for n in range(COUNTERS):
            url = f"/counter/n{n}"
            events, _ = await rt.read(url, limit=1_000_000)
            inbox = [
                (e["key"], e["value"]["payload"]["add"]) for e in events if e["type"] == "inbox"
            ]
            inbox_values = [v for _, v in inbox]
            assert len(set(inbox_values)) == len(inbox_values), (url, "a message landed twice")
            for value in inbox_values:
                assert owner.get(value) == n, (url, value, "never sent here")
                assert value in ledger.acked or value in ledger.unknown, (url, value)
            keys = {k for k, _ in inbox}
            for value in plan[n]:
                if value in ledger.acked:
                    assert ledger.acked[value] in keys, (url, value, "acknowledged but lost")
            replies: dict[str, list[Any]] = {}
            for e in events:
                if e["type"] == "texts":
                    replies.setdefault(e["value"]["in_reply_to"], []).append(e["value"]["value"])
            running = 0
            for key, value in inbox:
                running += value
                assert replies.get(key) == [running], (url, key, replies.get(key), context)
            assert set(replies) == keys, (url, "replies to unknown messages")
            state = await rt.state_of(url)
            total = state["totals"].get("total", {"value": 0})["value"]
            assert total == running, (url, context)
            info = await rt.get(url)
            assert not info.pending and info.status == "idle"
            redelivered += sum(
                1 for e in events if e["type"] == "runs" and e["value"]["attempt"] > 1
            )
    if deployment.marks is not None:  # split mode kills only once a wake is in flight
        assert redelivered >= 1, ("no kill hit a wake in flight", context)
