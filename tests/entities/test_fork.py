"""Fork: a new entity sharing another's history up to a point (a ``streams`` fork, no copy),
then living on its own; and ``Registry.include``, which composes registries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from entities import (
    DefinitionError,
    DuplicateEntity,
    EntityNotFound,
    HandlerContext,
    InvalidForkPoint,
    Registry,
    Runtime,
    VirtualClock,
    WakeEvent,
)
from entities.server import create_app
from examples import counter, fanout
from tests._live import serving

registry = Registry().include(counter.registry).include(fanout.registry)


@registry.define("broken", max_attempts=1)
async def broken(ctx: HandlerContext, wake: WakeEvent) -> None:
    raise RuntimeError("always")


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        yield runtime


async def add(rt: Runtime, url: str, n: int) -> Any:
    receipt = await rt.send(url, {"add": n})
    await rt.run_until_idle()
    [reply] = await rt.replies(url, receipt.key, after=receipt.offset)
    return reply


async def test_a_fork_shares_history_then_lives_on_its_own(rt: Runtime) -> None:
    await rt.spawn("/counter/src", tags={"team": "a"})
    assert await add(rt, "/counter/src", 2) == 2
    assert await add(rt, "/counter/src", 3) == 5
    info = await rt.fork("/counter/src", "copy")
    assert (info.url, info.status, info.pending, info.tags) == (
        "/counter/copy",
        "idle",
        False,
        {"team": "a"},
    )
    # forking runs nothing; the fork's state is the source's
    assert (await rt.state_of("/counter/copy"))["totals"]["total"]["value"] == 5
    assert await add(rt, "/counter/copy", 10) == 15
    assert await add(rt, "/counter/src", 1) == 6  # the source is untouched by the fork
    assert await add(rt, "/counter/copy", 1) == 16
    events, _ = await rt.read("/counter/copy", "-1", limit=10_000)
    created = [e for e in events if e["type"] == "entity_created"]
    assert [c["value"]["url"] for c in created] == ["/counter/src", "/counter/copy"]
    assert created[-1]["value"]["forked_from"] == "/counter/src"
    # the shared prefix is the source's own messages, offsets and all
    source_events, _ = await rt.read("/counter/src", "-1", limit=10_000)
    fork_point = created[-1]["value"]["fork_offset"]
    shared = [e for e in source_events if e["offset"] <= fork_point]
    assert events[: len(shared)] == shared
    # the fork's first wake ran (an entity_created in a wake's range runs on_create: it must
    # not: the created change is acknowledged with the fork)
    runs = [e for e in events if e["type"] == "runs" and e["offset"] > fork_point]
    assert len(runs) == 2 and all(r["value"]["status"] == "completed" for r in runs)


async def test_messages_the_source_had_not_processed_are_queued_in_the_fork(rt: Runtime) -> None:
    await rt.spawn("/counter/src")
    await add(rt, "/counter/src", 1)
    queued = await rt.send("/counter/src", {"add": 5})  # not yet processed
    fork = await rt.fork("/counter/src", "f")
    assert fork.pending and fork.queue == 1
    await rt.run_until_idle()
    assert await rt.replies("/counter/src", queued.key) == [6]
    assert await rt.replies("/counter/f", queued.key) == [6]  # the same key, answered twice
    assert await add(rt, "/counter/f", 1) == 7


async def test_a_fork_at_an_earlier_point(rt: Runtime) -> None:
    await rt.spawn("/counter/src")
    await add(rt, "/counter/src", 2)
    early = await rt.fork("/counter/src", "early", at="latest_completed_run")
    await add(rt, "/counter/src", 3)
    source = await rt.get("/counter/src")
    later = await rt.fork("/counter/src", "later", at="latest_completed_run")
    assert later.url == "/counter/later" and source.acked
    assert await add(rt, "/counter/early", 0) == 2
    assert await add(rt, "/counter/later", 0) == 5
    # an explicit offset: the point "latest_completed_run" named for the first fork
    events, _ = await rt.read("/counter/early", "-1", limit=10_000)
    point = [e for e in events if e["type"] == "entity_created"][-1]["value"]["fork_offset"]
    await rt.fork("/counter/src", "explicit", at=point)
    assert await add(rt, "/counter/explicit", 100) == 102
    # an offset is a point in the log: at the end of the "add 3" wake's range, before that
    # wake's own commit, the fork has the message (taken) but not what the wake wrote
    events, _ = await rt.read("/counter/src", "-1", limit=10_000)
    runs = [e for e in events if e["type"] == "runs" and e["value"]["status"] == "completed"]
    assert len(runs) == 2  # the creation and "add 2" were one wake
    await rt.fork("/counter/src", "mid", at=runs[1]["value"]["to_offset"])
    assert await add(rt, "/counter/mid", 100) == 102
    assert early.status == "idle"


async def test_bad_forks_are_refused_and_change_nothing(rt: Runtime) -> None:
    await rt.spawn("/counter/src")
    with pytest.raises(InvalidForkPoint, match="has not run yet"):
        await rt.fork("/counter/src", "x")
    await rt.spawn("/broken/b")
    await rt.run_until_idle()
    with pytest.raises(InvalidForkPoint, match="no completed run"):
        await rt.fork("/broken/b", "x", at="latest_completed_run")
    await add(rt, "/counter/src", 1)
    await rt.spawn("/counter/taken")
    with pytest.raises(DuplicateEntity):
        await rt.fork("/counter/src", "taken")
    with pytest.raises(InvalidForkPoint, match="malformed"):
        await rt.fork("/counter/src", "x", at="banana")
    with pytest.raises(InvalidForkPoint, match="beyond"):
        await rt.fork("/counter/src", "x", at="0000000000000000_0000000000999999")
    with pytest.raises(EntityNotFound):
        await rt.fork("/counter/missing", "x")
    assert await rt.lookup("/counter/x") is None
    assert {e.url for e in await rt.list_entities()} == {
        "/counter/src",
        "/counter/taken",
        "/broken/b",
    }


async def test_a_fork_leaves_children_and_schedules_with_the_source(rt: Runtime) -> None:
    await rt.spawn("/fanout/f")
    receipt = await rt.send("/fanout/f", {"n": 2})
    await rt.run_until_idle()
    assert await rt.replies("/fanout/f", receipt.key) == [5]
    source_manifest = (await rt.inspect("/fanout/f"))["manifest"]
    assert any(row["kind"] == "child" for row in source_manifest.values())
    await rt.fork("/fanout/f", "g")
    manifest = (await rt.inspect("/fanout/g"))["manifest"]
    assert not any(row["kind"] in ("child", "schedule") for row in manifest.values())
    children = await rt.list_entities(parent="/fanout/g")
    assert children == []
    # the fork runs a job of its own, with children of its own
    again = await rt.send("/fanout/g", {"n": 3})
    await rt.run_until_idle()
    assert await rt.replies("/fanout/g", again.key) == [14]
    assert len(await rt.list_entities(parent="/fanout/g")) == 3


async def test_fork_over_http(store_url: str) -> None:
    async with Runtime(registry, store_url) as runtime:
        await runtime.spawn("/counter/src")
        await add(runtime, "/counter/src", 4)
        async with serving(create_app(runtime)) as base:
            async with httpx2.AsyncClient(base_url=base) as http:
                made = await http.post("/_entities/entities/counter/src/fork", json={"id": "f"})
                assert made.status_code == 201 and made.json()["url"] == "/counter/f"
                again = await http.post("/_entities/entities/counter/src/fork", json={"id": "f"})
                assert again.status_code == 409
                bad = await http.post(
                    "/_entities/entities/counter/src/fork", json={"id": "g", "at": "soon"}
                )
                assert (
                    bad.status_code == 422 and bad.json()["error"]["code"] == "INVALID_FORK_POINT"
                )
                missing = await http.post("/_entities/entities/counter/nope/fork", json={"id": "g"})
                assert missing.status_code == 404
        assert await add(runtime, "/counter/f", 1) == 5


async def nothing(ctx: HandlerContext, wake: WakeEvent) -> None:
    return None


def test_include_composes_registries() -> None:
    a, b = Registry(), Registry()
    a.define("one", handler=nothing)
    b.define("two", handler=nothing)
    both = Registry().include(a).include(b).include(a)  # the same types again: a no-op
    assert [t.name for t in both.list()] == ["one", "two"]
    assert both.get("one") is a.get("one")
    clash = Registry()
    clash.define("two", handler=nothing)
    clash.define("three", handler=nothing)
    with pytest.raises(DefinitionError, match="'two' is already defined differently"):
        both.include(clash)
    assert "three" not in both  # nothing was added
