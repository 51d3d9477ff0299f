"""The claim stage on its own (``entities._pipeline.claim``), on every store backend: a lease is
a compare-and-set of the entity record that bumps its fencing epoch and fixes the wake's range.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from entities import HandlerContext, Registry, Runtime, VirtualClock, WakeEvent, collection
from entities._pipeline.claim import Claimer
from entities._records import ENTITY_NS, PENDING_NS, EntityRecord
from streams import KvPut

LEASE = 30.0


class Row(BaseModel):
    key: str


registry = Registry()


@registry.define("box", state={"rows": collection(Row)})
async def box(ctx: HandlerContext, wake: WakeEvent) -> None:
    return None


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        yield runtime


def claimer(rt: Runtime, worker: str) -> Claimer:
    return Claimer(rt.store, rt.clock, worker, lease_seconds=LEASE, cache_size=16)


async def record_of(rt: Runtime, url: str) -> EntityRecord:
    raw = await rt.store.kv_get(ENTITY_NS, url)
    assert raw is not None
    return EntityRecord.load(raw)


async def test_a_claim_leases_the_entity_and_fixes_the_range(rt: Runtime) -> None:
    await rt.spawn("/box/a")
    receipt = await rt.send("/box/a", {"n": 1})
    before = await record_of(rt, "/box/a")
    mark = await rt.store.kv_get(PENDING_NS, "/box/a")
    one = claimer(rt, "w1")
    claim = await one.claim("/box/a")
    assert claim is not None and claim.token == mark
    record = await record_of(rt, "/box/a")
    assert record == claim.record
    assert record.owner == "w1" and record.status == "running"
    assert record.epoch == before.epoch + 1
    assert record.lease_expires == rt.clock.now() + LEASE
    assert record.inflight is not None and record.inflight.attempt == 1
    assert record.inflight.from_offset == "-1" and record.inflight.to_offset == receipt.offset
    assert claim.loaded is not None
    assert [e["type"] for e in claim.loaded.events][-1] == "inbox"
    assert one.counts == {"won": 1}


async def test_a_held_lease_blocks_other_workers_until_it_expires(rt: Runtime) -> None:
    await rt.spawn("/box/b")
    first = await claimer(rt, "w1").claim("/box/b")
    assert first is not None and first.record.inflight is not None
    other = claimer(rt, "w2")
    assert await other.claim("/box/b") is None
    assert other.counts == {"held": 1}
    assert other.until("/box/b") == first.record.lease_expires
    assert (await record_of(rt, "/box/b")).owner == "w1"  # nothing written
    assert isinstance(rt.clock, VirtualClock)
    rt.clock.advance(LEASE + 1)  # w1 died: its lease lapses and the wake is redelivered
    second = await other.claim("/box/b")
    assert second is not None and second.record.inflight is not None
    assert second.record.owner == "w2"
    assert second.record.epoch == first.record.epoch + 1
    assert second.record.inflight.attempt == 2  # the same range, one more attempt
    assert second.record.inflight.wake_id == first.record.inflight.wake_id


async def test_a_stale_cached_record_costs_one_fresh_read(rt: Runtime) -> None:
    await rt.spawn("/box/c")
    worker = claimer(rt, "w1")
    stale = await rt.store.kv_get(ENTITY_NS, "/box/c")
    worker.remember("/box/c", stale)
    await rt.run_until_idle()  # another worker ran the first wake: the cached bytes are stale
    await rt.send("/box/c", {"n": 2})
    claim = await worker.claim("/box/c")
    assert claim is not None  # the compare-and-set failed once, then a fresh read won
    assert worker.counts == {"lost": 1, "won": 1}
    assert claim.record.runs == 1 and worker.records["/box/c"] == claim.raw


async def test_orphan_and_stopped_marks_are_dropped(rt: Runtime) -> None:
    worker = claimer(rt, "w1")
    await rt.store.commit([KvPut(PENDING_NS, "/box/ghost", b"t")])  # no record behind it
    assert await worker.claim("/box/ghost") is None
    assert await rt.store.kv_get(PENDING_NS, "/box/ghost") is None
    await rt.spawn("/box/e")
    await rt.kill("/box/e")
    await rt.store.commit([KvPut(PENDING_NS, "/box/e", b"t")])
    assert await worker.claim("/box/e") is None
    assert await rt.store.kv_get(PENDING_NS, "/box/e") is None
    assert (await record_of(rt, "/box/e")).status == "stopped"


async def test_a_mark_with_nothing_to_run_is_cleared_without_a_wake(rt: Runtime) -> None:
    await rt.spawn("/box/f")
    await rt.run_until_idle()  # the first wake ran and was acknowledged
    before = await record_of(rt, "/box/f")
    await rt.store.commit([KvPut(PENDING_NS, "/box/f", b"stale")])  # a conservative re-mark
    worker = claimer(rt, "w1")
    assert await worker.claim("/box/f") is None
    assert worker.counts == {"empty": 1}
    assert await rt.store.kv_get(PENDING_NS, "/box/f") is None
    assert await record_of(rt, "/box/f") == before  # no lease was taken


async def test_a_mark_written_after_the_scan_is_left_alone(rt: Runtime) -> None:
    await rt.spawn("/box/g")
    await rt.run_until_idle()
    await rt.store.commit([KvPut(PENDING_NS, "/box/g", b"new")])
    worker = claimer(rt, "w1")
    # a stolen claim under the mark the scan saw does nothing once the mark changed
    assert await worker.claim("/box/g", b"old", stolen=True) is None
    assert await rt.store.kv_get(PENDING_NS, "/box/g") == b"new"
    assert sum(worker.counts.values()) == 0


async def test_release_gives_the_lease_back_keeping_the_range(rt: Runtime) -> None:
    await rt.spawn("/box/h")
    worker = claimer(rt, "w1")
    claim = await worker.claim("/box/h")
    assert claim is not None and claim.record.inflight is not None
    assert await worker.release(claim)
    released = await record_of(rt, "/box/h")
    assert released.owner is None and released.status == "idle"
    assert released.inflight == claim.record.inflight
    again = await claimer(rt, "w2").claim("/box/h")  # redelivered at once, not after the lease
    assert again is not None and again.record.inflight is not None
    assert again.record.inflight.attempt == 2
    assert not await worker.release(claim)  # a stale claim cannot release anything


async def test_renew_extends_a_lease_until_it_is_taken_over(rt: Runtime) -> None:
    await rt.spawn("/box/i")
    worker = claimer(rt, "w1")
    claim = await worker.claim("/box/i")
    assert claim is not None
    assert isinstance(rt.clock, VirtualClock)
    rt.clock.advance(10)
    assert await worker.renew(claim)
    assert (await record_of(rt, "/box/i")).lease_expires == rt.clock.now() + LEASE
    rt.clock.advance(LEASE + 1)
    assert await claimer(rt, "w2").claim("/box/i") is not None
    assert not await worker.renew(claim)
    assert (await record_of(rt, "/box/i")).owner == "w2"
