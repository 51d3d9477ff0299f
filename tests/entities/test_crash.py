"""``entities serve`` SIGKILLed repeatedly while it takes messages loses and doubles nothing.

Twenty counters get several hundred ``{"add": v}`` messages with distinct values over HTTP from
many concurrent senders while the server process is killed with SIGKILL at random moments and
restarted on the same SQLite file and port. A send answered ``202`` is *acknowledged*; a send
whose connection broke after the request went out is *unknown* (it may or may not have landed);
a refused connection is retried, since nothing was sent.

After the last restart every counter must settle, and then, for every counter:

- every acknowledged message is in its inbox exactly once, every inbox message is one we sent
  (acknowledged or unknown), and no value appears twice;
- every inbox message has exactly one reply, and the replies are the running totals in inbox
  order (each message applied exactly once, in order, across crashes and redeliveries);
- the final ``totals.total.value`` is the sum of the inbox.
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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EntitiesProcess]:
    port = free_port()
    process = EntitiesProcess(
        [
            *("serve", "examples/counter.py:registry"),
            *("--db", f"sqlite:///{tmp_path / 'c.db'}", "--port", str(port)),
            *("--lease-seconds", LEASE_SECONDS),
        ],
        log=tmp_path / "serve.log",
        port=port,
    )
    try:
        yield process
    finally:
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
    server: EntitiesProcess, rng: random.Random, ledger: Ledger, done: asyncio.Event
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
        await asyncio.sleep(rng.uniform(0.0, 0.03))
        server.kill()
        kills += 1
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        await asyncio.to_thread(server.start)
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


async def test_sigkill_loses_and_doubles_nothing(server: EntitiesProcess, tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    await asyncio.to_thread(server.start)
    base = f"http://127.0.0.1:{server.port}"
    values = list(range(1, COUNTERS * PER_COUNTER + 1))
    rng.shuffle(values)
    plan = {n: values[n * PER_COUNTER : (n + 1) * PER_COUNTER] for n in range(COUNTERS)}
    ledger = Ledger()
    limits = httpx2.Limits(max_connections=COUNTERS, max_keepalive_connections=COUNTERS)
    async with httpx2.AsyncClient(base_url=base, timeout=10, limits=limits) as http:
        await _spawn_all(http)
        done = asyncio.Event()
        killer = asyncio.create_task(_killer(server, rng, ledger, done))
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

    server.kill()
    owner = {v: n for n, vs in plan.items() for v in vs}
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
