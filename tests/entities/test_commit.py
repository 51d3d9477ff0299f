"""The commit stage on its own (``entities._pipeline.commit``), on every store backend: a wake's
outcome is one transaction checked against the record its claim wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from entities import HandlerContext, Registry, Runtime, VirtualClock, WakeEvent, collection
from entities._effects import Effects, PendingSend
from entities._events import change, event
from entities._pipeline.claim import Claim, Claimer
from entities._pipeline.commit import retry_commit, wake_commit, without_path
from entities._pipeline.load import load_range, read_snapshot
from entities._records import ENTITY_NS, PENDING_NS, SNAPSHOT_NS, TAG_NS, EntityRecord
from entities._urls import parse_url
from streams import Append, ConditionFailed, KvPut, Op

registry = Registry()


class Row(BaseModel):
    key: str
    n: int = 0


@registry.define("box", state={"rows": collection(Row)})
async def box(ctx: HandlerContext, wake: WakeEvent) -> None:
    return None


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        yield runtime


async def claimed(rt: Runtime, url: str, worker: str = "w1") -> Claim:
    claimer = Claimer(rt.store, rt.clock, worker, lease_seconds=30, cache_size=8)
    claim = await claimer.claim(url)
    assert claim is not None and claim.record.inflight is not None
    if claim.loaded is None:  # a redelivery: the worker loads the claimed range
        inflight = claim.record.inflight
        claim.loaded = await claimer.load(
            claim.url, inflight.from_offset, inflight.to_offset, claim.record.created_at
        )
    return claim


async def commit(
    rt: Runtime, claim: Claim, effects: Effects, *, snapshot_every: int = 200
) -> tuple[list[Op], bool]:
    assert claim.loaded is not None
    done = await wake_commit(
        rt.store,
        claim.url,
        claim.record,
        claim.raw,
        claim.token,
        [],
        [effects],
        claim.loaded.view,
        claim.loaded.base_offset,
        rt.clock.now(),
        snapshot_every=snapshot_every,
        run_status="completed",
    )
    results = await rt.store.commit(done.ops)
    cleared = next(r for op, r in zip(done.ops, results, strict=True) if op is done.clear)
    return done.ops, done.more or cleared is False


async def events_of(rt: Runtime, url: str) -> list[dict[str, Any]]:
    found, _ = await rt.read(url, "-1", limit=10_000)
    return found


def wake_effects(rt: Runtime, claim: Claim, *, to: str | None = None) -> Effects:
    assert claim.record.inflight is not None
    wake_id, now = claim.record.inflight.wake_id, rt.clock.now()
    effects = Effects()
    effects.own.append(change("state:rows", "r1", {"key": "r1", "n": 1}, now, txid=wake_id))
    effects.own.append(change("tags", "color", {"value": "red"}, now, txid=wake_id))
    if to is not None:
        effects.sends.append(PendingSend(parse_url(to), {"hello": 1}, None, f"{wake_id}.1"))
    return effects


async def test_a_finished_wake_commits_effects_offset_and_release_together(rt: Runtime) -> None:
    await rt.spawn("/box/a")
    await rt.spawn("/box/b")
    await rt.run_until_idle()
    await rt.send("/box/a", {"go": 1})
    claim = await claimed(rt, "/box/a")
    inflight = claim.record.inflight
    assert inflight is not None
    sink_before = len(await events_of(rt, "/box/b"))
    _ops, more = await commit(rt, claim, wake_effects(rt, claim, to="/box/b"))
    assert not more
    raw = await rt.store.kv_get(ENTITY_NS, "/box/a")
    assert raw is not None
    record = EntityRecord.load(raw)
    assert record.acked == inflight.to_offset and record.owner is None
    assert record.status == "idle" and record.inflight is None and record.runs == 2
    assert await rt.store.kv_get(PENDING_NS, "/box/a") is None
    written = [e for e in await events_of(rt, "/box/a") if e["offset"] > inflight.to_offset]
    assert [(e["type"], e["key"]) for e in written] == [("state:rows", "r1"), ("tags", "color")]
    assert all(e["headers"]["txid"] == inflight.wake_id for e in written)
    assert await rt.store.kv_get(TAG_NS, "/box/a\ncolor") == b"red"
    delivered = (await events_of(rt, "/box/b"))[sink_before:]
    assert [(e["type"], e["value"]["payload"], e["value"]["from"]) for e in delivered] == [
        ("inbox", {"hello": 1}, "/box/a")
    ]
    assert await rt.store.kv_get(PENDING_NS, "/box/b") is not None


async def test_a_fenced_commit_changes_nothing(rt: Runtime) -> None:
    await rt.spawn("/box/a")
    await rt.spawn("/box/b")
    await rt.run_until_idle()
    await rt.send("/box/a", {"go": 1})
    claim = await claimed(rt, "/box/a")
    assert isinstance(rt.clock, VirtualClock)
    rt.clock.advance(31)
    takeover = await claimed(rt, "/box/a", "w2")  # the lease lapsed: another worker took it
    before = {u: len(await events_of(rt, u)) for u in ("/box/a", "/box/b")}
    with pytest.raises(ConditionFailed):
        await commit(rt, claim, wake_effects(rt, claim, to="/box/b"))
    assert {u: len(await events_of(rt, u)) for u in ("/box/a", "/box/b")} == before
    assert await rt.store.kv_get(ENTITY_NS, "/box/a") == takeover.raw
    assert await rt.store.kv_get(TAG_NS, "/box/a\ncolor") is None


async def test_a_send_to_itself_keeps_the_entity_pending(rt: Runtime) -> None:
    await rt.spawn("/box/a")
    claim = await claimed(rt, "/box/a")
    _ops, more = await commit(rt, claim, wake_effects(rt, claim, to="/box/a"))
    assert more
    assert await rt.store.kv_get(PENDING_NS, "/box/a") is not None
    assert (await events_of(rt, "/box/a"))[-1]["type"] == "inbox"


async def test_a_redelivered_wake_stays_pending_for_what_came_later(rt: Runtime) -> None:
    await rt.spawn("/box/a")
    first = await claimed(rt, "/box/a")
    assert isinstance(rt.clock, VirtualClock)
    rt.clock.advance(31)
    again = await claimed(rt, "/box/a", "w2")
    assert again.record.inflight is not None and again.record.inflight.attempt == 2
    assert first.token == again.token
    _ops, more = await commit(rt, again, Effects())
    assert more and await rt.store.kv_get(PENDING_NS, "/box/a") is not None


async def test_snapshots_are_versioned_and_old_ones_still_read(rt: Runtime) -> None:
    await rt.spawn("/box/a")
    await rt.run_until_idle()
    await rt.send("/box/a", {"go": 1})
    claim = await claimed(rt, "/box/a")
    assert claim.loaded is not None and claim.record.inflight is not None
    await commit(rt, claim, wake_effects(rt, claim), snapshot_every=1)
    saved = await rt.store.kv_get(SNAPSHOT_NS, "/box/a")
    assert saved is not None and orjson.loads(saved)["v"] == 1
    offset, view = read_snapshot(saved)
    assert offset == claim.record.inflight.to_offset
    assert view["entity_created"]["entity"]["url"] == "/box/a"
    # a snapshot written before snapshots had a version: the fold starts from it all the same
    legacy = orjson.dumps({"offset": offset, "collections": view})
    await rt.store.commit([KvPut(SNAPSHOT_NS, "/box/a", legacy)])
    record = EntityRecord.load((await rt.store.kv_get(ENTITY_NS, "/box/a")) or b"")
    loaded = await load_range(rt.store, claim.url, record.acked, None)
    assert loaded.base_offset == offset
    assert loaded.view["state:rows"] == {"r1": {"key": "r1", "n": 1}}
    assert [e["type"] for e in loaded.events] == ["state:rows", "tags"]


async def test_a_retried_attempt_records_its_failure_and_journal(rt: Runtime) -> None:
    await rt.spawn("/box/a")
    claim = await claimed(rt, "/box/a")
    inflight = claim.record.inflight
    assert inflight is not None
    now = rt.clock.now()
    effects = Effects()
    effects.journal.append({"wake_id": inflight.wake_id, "name": "now:1", "result": now})
    head = [event("runs", inflight.wake_id, {"status": "failed"}, now)]
    ops, retry, raw = retry_commit(claim.url, claim.record, claim.raw, head, effects, now, 2.0)
    await rt.store.commit(ops)
    assert await rt.store.kv_get(ENTITY_NS, "/box/a") == raw
    assert retry.retry_at == now + 2.0 and retry.owner is None
    assert retry.inflight == inflight  # the next attempt runs the same range
    tail = (await events_of(rt, "/box/a"))[-2:]
    assert [(e["type"], e["key"]) for e in tail] == [
        ("runs", inflight.wake_id),
        ("steps", f"{inflight.wake_id}/now:1"),
    ]
    with pytest.raises(ConditionFailed):  # checked against the claimed record, once
        await rt.store.commit(ops)


def test_without_path_drops_one_recipient() -> None:
    ops: list[Op] = [
        Append("box/a/main", [b"{}"]),
        Append("box/b/main", [b"{}"]),
        KvPut(PENDING_NS, "/box/b", b"t"),
        KvPut(PENDING_NS, "/box/a", b"t"),
    ]
    assert without_path(ops, "box/b/main") == [ops[0], ops[3]]
