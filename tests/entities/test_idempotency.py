"""Idempotent ingress: a send or spawn with an idempotency key is applied once; the same key
again gets the first answer and changes nothing (from Python, over HTTP, and by a client that
retries every send whose connection broke while the server is SIGKILLed)."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from entities import (
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    Runtime,
    VirtualClock,
)
from entities._idempotency import EXPIRY_NS, IDEMPOTENCY_NS, RETENTION_SECONDS, prune
from entities.server import create_app
from examples.counter import registry
from streams import KvPut
from tests._live import serving

from ._support import EntitiesProcess, free_port


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        yield runtime


async def inbox(rt: Runtime, url: str) -> list[dict[str, Any]]:
    events, _ = await rt.read(url, "-1", limit=100_000)
    return [e for e in events if e["type"] == "inbox"]


async def test_a_send_with_a_key_is_applied_once(rt: Runtime) -> None:
    await rt.spawn("/counter/a")
    first = await rt.send("/counter/a", {"add": 2}, idempotency_key="order-17")
    again = await rt.send("/counter/a", {"add": 2}, idempotency_key="order-17")
    assert again == first
    other = await rt.send("/counter/a", {"add": 2}, idempotency_key="order-18")
    assert other.key != first.key
    assert [e["key"] for e in await inbox(rt, "/counter/a")] == [first.key, other.key]
    with pytest.raises(IdempotencyKeyReused):  # the key names one request
        await rt.send("/counter/a", {"add": 3}, idempotency_key="order-17")
    await rt.spawn("/counter/b")  # keys are per entity
    elsewhere = await rt.send("/counter/b", {"add": 2}, idempotency_key="order-17")
    assert elsewhere.url == "/counter/b"
    await rt.run_until_idle()
    assert await rt.replies("/counter/a", first.key) == [2]


async def test_a_lost_answer_is_rebuilt_from_the_message(rt: Runtime) -> None:
    """The process died between the commit and writing the answer: the row has no answer, and
    a retry finds the message again instead of sending it twice."""
    await rt.spawn("/counter/c")
    await rt.send("/counter/c", {"add": 1})
    first = await rt.send("/counter/c", {"add": 5}, idempotency_key="k")
    [(slot, raw)] = await rt.store.kv_scan(IDEMPOTENCY_NS)
    row = orjson.loads(raw)
    row["answer"] = None
    await rt.store.commit([KvPut(IDEMPOTENCY_NS, slot, orjson.dumps(row))])
    assert await rt.send("/counter/c", {"add": 5}, idempotency_key="k") == first
    assert len(await inbox(rt, "/counter/c")) == 2
    assert orjson.loads((await rt.store.kv_get(IDEMPOTENCY_NS, slot)) or b"")["answer"]


async def test_keys_expire_after_the_retention_window(rt: Runtime) -> None:
    await rt.spawn("/counter/d")
    first = await rt.send("/counter/d", {"add": 1}, idempotency_key="k")
    assert isinstance(rt.clock, VirtualClock)
    rt.clock.advance(RETENTION_SECONDS + 1)
    later = await rt.send("/counter/d", {"add": 1}, idempotency_key="k")
    assert later.key != first.key  # a new request: the key was forgotten
    rt.clock.advance(RETENTION_SECONDS + 1)
    assert await prune(rt.store, rt.clock.now()) == 1
    assert await rt.store.kv_scan(IDEMPOTENCY_NS) == []
    assert await rt.store.kv_scan(EXPIRY_NS) == []


async def test_a_spawn_with_a_key_is_applied_once(rt: Runtime) -> None:
    first = await rt.spawn("/counter/s", tags={"team": "red"}, idempotency_key="create-s")
    await rt.run_until_idle()  # the entity moves on; the answer stays the first one
    again = await rt.spawn("/counter/s", tags={"team": "red"}, idempotency_key="create-s")
    assert again.to_json() == first.to_json()
    with pytest.raises(IdempotencyKeyReused):
        await rt.spawn("/counter/s", tags={"team": "blue"}, idempotency_key="create-s")


@pytest.mark.parametrize("key", ["", "x" * 257, "tab\there", "é"])
async def test_bad_keys_are_refused(rt: Runtime, key: str) -> None:
    await rt.spawn("/counter/e")
    with pytest.raises(InvalidIdempotencyKey):
        await rt.send("/counter/e", {"add": 1}, idempotency_key=key)
    assert await inbox(rt, "/counter/e") == []


async def test_the_http_header_makes_sends_and_spawns_idempotent(tmp_path: Path) -> None:
    async with (
        Runtime(registry, f"sqlite:///{tmp_path / 'h.db'}") as rt,
        serving(create_app(rt)) as url,
        httpx2.AsyncClient(base_url=url) as http,
    ):
        spawn = "/_entities/entities/counter/h"
        headers = {"Idempotency-Key": "spawn-h"}
        created = await http.put(spawn, json={"tags": {"a": "b"}}, headers=headers)
        repeated = await http.put(spawn, json={"tags": {"a": "b"}}, headers=headers)
        assert created.status_code == repeated.status_code == 201
        assert repeated.json() == created.json()
        assert (await http.put(spawn, json={})).status_code == 409  # without a key
        send = f"{spawn}/send"
        body = {"payload": {"add": 4}}
        sent = await http.post(send, json=body, headers={"Idempotency-Key": "s1"})
        resent = await http.post(send, json=body, headers={"Idempotency-Key": "s1"})
        assert sent.status_code == resent.status_code == 202
        assert resent.json() == sent.json()
        reused = await http.post(
            send, json={"payload": {"add": 5}}, headers={"Idempotency-Key": "s1"}
        )
        assert reused.status_code == 422
        assert reused.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
        for bad in ("x" * 257, "\x7f"):
            refused = await http.post(send, json=body, headers={"Idempotency-Key": bad})
            assert refused.status_code == 422
            assert refused.json()["error"]["code"] == "INVALID_IDEMPOTENCY_KEY"
        assert len(await inbox(rt, "/counter/h")) == 1


SENDS = 600
SENDERS = 12
KILLS = 3


async def test_a_client_retrying_through_sigkills_applies_each_send_once(tmp_path: Path) -> None:
    """Senders with one key per message retry every send whose connection failed, including
    those the server may have applied before it was SIGKILLed: each lands exactly once, and
    the retry gets the receipt of the message that landed."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    port = free_port()
    db = f"sqlite:///{tmp_path / 'i.db'}"
    server = EntitiesProcess(
        ["serve", "examples/counter.py:registry", "--db", db, "--port", str(port)],
        log=tmp_path / "serve.log",
        port=port,
    )
    receipts: dict[int, str] = {}
    unknown = 0
    try:
        await asyncio.to_thread(server.start)
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert (await http.put("/_entities/entities/counter/i", json={})).status_code == 201

            async def sender(values: list[int]) -> None:
                nonlocal unknown
                for value in values:
                    while True:
                        try:
                            response = await http.post(
                                "/_entities/entities/counter/i/send",
                                json={"payload": {"add": value}},
                                headers={"Idempotency-Key": f"add-{value}"},
                            )
                        except httpx2.ConnectError:  # refused: the server is restarting
                            await asyncio.sleep(0.05)
                            continue
                        except httpx2.TransportError:  # sent, maybe applied: send it again
                            unknown += 1
                            await asyncio.sleep(0.05)
                            continue
                        assert response.status_code == 202, response.text
                        receipts[value] = response.json()["key"]
                        break

            async def killer() -> None:
                # each kill once a random share of the sends was answered: sends are in flight
                for mark in sorted(rng.sample(range(SENDS // 10, SENDS * 3 // 4), KILLS)):
                    while len(receipts) < mark:  # noqa: ASYNC110 - polled by design
                        await asyncio.sleep(0.001)
                    server.kill()
                    await asyncio.sleep(rng.uniform(0.0, 0.2))
                    await asyncio.to_thread(server.start)

            values = list(range(1, SENDS + 1))
            shares = [values[i::SENDERS] for i in range(SENDERS)]
            await asyncio.gather(killer(), *(sender(share) for share in shares))
    finally:
        server.kill()
    async with Runtime(registry, db) as rt:
        events = await inbox(rt, "/counter/i")
    landed = {e["value"]["payload"]["add"]: e["key"] for e in events}
    context = f"seed={seed} unknown={unknown} inbox={len(events)}"
    assert len(events) == SENDS, context  # none lost, none doubled
    assert landed == receipts, context  # every answer names the message that landed
    assert unknown > 0, context  # some sends were cut off after they went out
