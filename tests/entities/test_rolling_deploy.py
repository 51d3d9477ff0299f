"""A rolling deploy on PostgreSQL with two real ``entities worker`` processes on different code.

The old code serves types ``a`` and ``b`` (``--deploy-version v1``), the new code ``a`` and ``c``
(``v2``). While messages to all three types keep coming, the old worker is stopped (SIGTERM, or
SIGKILL) mid-stream. Every wake is run only by a worker that serves its type (each ``runs`` row
names the worker and its deploy version); ``a``'s wakes carry on on the new worker (a killed
worker's after its lease ends); ``b``'s entities wait, ``orphaned`` for the new code, until a
worker with ``b`` returns and runs every one of their messages. Nothing is stranded: at the end
nothing is pending and every message has its reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities._records import PENDING_NS
from streams import open_store
from tests import _postgres

from ._support import EntitiesProcess

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

APP = """
from __future__ import annotations

import anyio

from entities import Registry

registry = Registry()


async def handler(ctx, wake):
    for message in wake.messages:
        await anyio.sleep(0.01)  # wakes take a while: a stop finds some under way
        ctx.reply("done", to=message)


for name in {types!r}:
    registry.define(name)(handler)
"""
LEASE = "2"
PER_TYPE = 4  # entities of each type
ROUNDS = 12  # messages to each entity: half before the old worker stops, half after


def registry_of(*types: str) -> Registry:
    """Types (no code runs them here: the test process only sends and reads)."""
    registry = Registry()

    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        raise AssertionError("the test process runs no wakes")

    for name in types:
        registry.define(name)(handler)
    return registry


@pytest.fixture
def db() -> Iterator[str]:
    _postgres.check()
    url = _postgres.fresh_url()
    try:
        yield url
    finally:
        _postgres.drop_schema_sync(url)


def worker(tmp_path: Path, db: str, name: str, version: str, types: tuple[str, ...]) -> Any:
    app = tmp_path / f"app_{name}.py"
    app.write_text(APP.replace("{types!r}", repr(types)))
    return EntitiesProcess(
        ["worker", f"{app}:registry", "--db", db, "--worker-id", name,
         "--deploy-version", version, "--lease-seconds", LEASE, "--concurrency", "8"],
        log=tmp_path / f"{name}.log",
    )  # fmt: skip


def wait_started(process: EntitiesProcess) -> None:
    deadline = time.monotonic() + 30
    while "entities: worker" not in process.output():
        assert process.proc is not None and process.proc.poll() is None, process.output()
        assert time.monotonic() < deadline, process.output()
        time.sleep(0.05)


async def live_workers(rt: Runtime, names: set[str]) -> dict[str, Any]:
    """The presence of the workers ``names``, once each announced itself."""
    deadline = time.monotonic() + 30
    while True:
        found = {w.id: w for w in await rt.workers() if w.live}
        if names <= found.keys():
            return found
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def settle(rt: Runtime, types: tuple[str, ...], *, seconds: float = 60.0) -> None:
    """Wait until no entity of ``types`` is pending or running."""
    deadline = time.monotonic() + seconds
    while True:
        pending = [k for k, _ in await rt.store.kv_scan(PENDING_NS) if k.split("/")[1] in types]
        running = [i.url for i in await rt.list_entities() if i.status == "running"]
        running = [u for u in running if u.split("/")[1] in types]
        if not pending and not running:
            return
        assert time.monotonic() < deadline, (pending, running)
        await asyncio.sleep(0.1)


async def runs_of(rt: Runtime, url: str) -> list[dict[str, Any]]:
    events, _ = await rt.read(url, limit=100_000)
    return [e["value"] for e in events if e["type"] == "runs" and "wake_id" in e["value"]]


async def unanswered(rt: Runtime, url: str) -> list[str]:
    """The inbox messages of ``url`` that have no reply."""
    events, _ = await rt.read(url, limit=100_000)
    asked = [e["key"] for e in events if e["type"] == "inbox"]
    answered = {
        e["value"]["in_reply_to"]
        for e in events
        if e["type"] == "texts" and isinstance(e.get("value"), dict)
    }
    return [k for k in asked if k not in answered]


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_old_and_new_workers_each_run_only_their_types(
    db: str, tmp_path: Path, stop: str
) -> None:
    old = worker(tmp_path, db, "old", "v1", ("a", "b"))
    new = worker(tmp_path, db, "new", "v2", ("a", "c"))
    urls = {t: [f"/{t}/{i}" for i in range(PER_TYPE)] for t in "abc"}
    everyone = [u for group in urls.values() for u in group]
    async with open_store(db) as store:
        rt = Runtime(registry_of("a", "b", "c"), store)
        for url in everyone:
            await rt.spawn(url)
        old.start()
        new.start()
        try:
            wait_started(old)
            wait_started(new)
            announced = await live_workers(rt, {"old", "new"})
            assert announced["old"].types == ("a", "b")
            assert announced["new"].types == ("a", "c")
            assert (announced["old"].deploy_version, announced["new"].deploy_version) == (
                "v1",
                "v2",
            )

            for n in range(ROUNDS):
                if n == ROUNDS // 2:  # mid-stream: the old code goes away
                    if stop == "sigterm":
                        old.stop()
                    else:
                        old.kill()
                    assert old.proc is not None and old.proc.poll() is not None
                await asyncio.gather(*(rt.send(u, {"n": n}) for u in everyone))
                await asyncio.sleep(0.03)

            await settle(rt, ("a", "c"), seconds=60)
            # the new code's view: b's entities that still have wakes are orphaned, not stuck
            async with Runtime(registry_of("a", "c"), store) as new_view:
                for url in urls["b"]:
                    info = await new_view.get(url)
                    assert info.status == "orphaned" and info.pending, info
                assert {i.url for i in await new_view.list_entities(status="orphaned")} == set(
                    urls["b"]
                )
            for url in urls["a"] + urls["c"]:
                assert await unanswered(rt, url) == [], url
            for url in urls["b"]:  # b's later messages wait for b's code
                assert len(await unanswered(rt, url)) >= ROUNDS // 2, url

            back = worker(tmp_path, db, "old-again", "v1", ("a", "b"))
            back.start()
            try:
                wait_started(back)
                await settle(rt, ("a", "b", "c"), seconds=60)
            finally:
                back.stop()
        finally:
            old.stop()
            new.stop()

        for url in everyone:
            assert await unanswered(rt, url) == [], url
        assert await store.kv_scan(PENDING_NS) == []
        ran_by: dict[str, set[tuple[str, str]]] = {t: set() for t in "abc"}
        attempts: dict[str, set[int]] = {t: set() for t in "abc"}
        for t, group in urls.items():
            for url in group:
                for run in await runs_of(rt, url):
                    attempts[t].add(run["attempt"])
                    if run["status"] != "completed" or run["event_count"] == 0:
                        continue
                    ran_by[t].add((run["worker"], run.get("deploy", "")))
        logs = "\n".join(p.output()[-2000:] for p in (old, new))
        # each wake ran on a worker that serves its type, and says which code ran it
        assert ran_by["a"] == {("old", "v1"), ("new", "v2")}, logs
        assert ran_by["b"] <= {("old", "v1"), ("old-again", "v1")}, logs
        assert ("old-again", "v1") in ran_by["b"], logs  # the orphaned wakes, once b returned
        assert ran_by["c"] == {("new", "v2")}, logs
        # no wake was claimed by a worker that lacks its type (it would fail to run it, and
        # the wake would run again, as a later attempt, once that claim's lease ran out)
        assert attempts["c"] == {1}, logs
        if stop == "sigterm":  # a drained stop leaves nothing to redeliver
            assert attempts["a"] == attempts["b"] == {1}, logs
        for t in "ac":  # after the stop, a's and c's wakes all ran on the new code
            for url in urls[t]:
                last = [r for r in await runs_of(rt, url) if r["status"] == "completed"][-1]
                assert (last["worker"], last["deploy"]) == ("new", "v2")
