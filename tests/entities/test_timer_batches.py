"""``fire_due`` fires due timers in batches (one transaction each) and falls back to one
transaction per timer when a batch cannot commit: a cancelled or replaced timer, or a target
that is gone, must not stop the others, and nothing may fire twice. On every store backend."""

from __future__ import annotations

from typing import Any

from entities import HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities._manifest import ScheduleEntry
from entities._pipeline.fire import BAD_TIMER_NS, fire_due
from entities._records import SCHEDULE_NS, TIMER_NS
from entities._timers import TimerValue, arm_ops, cancel_ops, timer_key
from streams import KvPut, Op

registry = Registry()


@registry.define("sink", description="receives delayed sends")
async def sink(ctx: HandlerContext, wake: WakeEvent) -> None:
    pass


@registry.define("src", description="owns the timers")
async def src(ctx: HandlerContext, wake: WakeEvent) -> None:
    pass


def _send(i: int, due: float, target: str) -> TimerValue:
    return TimerValue(
        kind="future_send",
        owner="/src/s",
        schedule_id=f"send:m{i}",
        due=due,
        target=target,
        payload={"i": i},
    )


async def _sink_and_source(rt: Runtime, clock: VirtualClock) -> float:
    """Spawn ``/sink/a`` and ``/src/s``, run their first wakes; return a due time 1 s ahead."""
    await rt.spawn("/sink/a")
    await rt.spawn("/src/s")
    await rt.run_until_idle()
    return clock.now() + 1


async def _inbox(rt: Runtime, url: str) -> list[Any]:
    found: list[Any] = []
    offset = "-1"
    while True:
        batch, offset = await rt.read(url, offset, limit=1000)
        found.extend(e["value"]["payload"]["i"] for e in batch if e["type"] == "inbox")
        if len(batch) < 1000:
            return found


async def test_batches_fire_in_due_order_exactly_once(store_url: str) -> None:
    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        await rt.spawn("/sink/a")
        await rt.spawn("/src/s")
        await rt.run_until_idle()
        start = clock.now()
        ops: list[Op] = []
        for i in range(1200):
            ops.extend(arm_ops(_send(i, start + 1 + i / 1000, "/sink/a")))
        await rt.store.commit(ops)
        assert await fire_due(rt.store, start + 1.5, batch=500) == 501  # due: 0..500
        assert await fire_due(rt.store, start + 1.5, batch=500) == 0
        assert await fire_due(rt.store, start + 10, batch=500) == 699
        assert await rt.store.kv_scan(TIMER_NS) == []
        assert await rt.store.kv_scan(SCHEDULE_NS) == []
        assert await _inbox(rt, "/sink/a") == list(range(1200))
        # the sender's schedule entries say each send was delivered (status, when, how late)
        manifests = (await rt.view("/src/s"))["manifests"]
        sent = [ScheduleEntry.model_validate(e) for e in manifests.values()]
        assert len(sent) == 1200 and {e.status for e in sent} == {"sent"}
        assert all(e.sent_at is not None and e.late_ms is not None for e in sent)
        assert {e.id for e in sent} == {f"send:m{i}" for i in range(1200)}


async def test_a_failing_timer_falls_back_to_one_by_one(store_url: str) -> None:
    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        await rt.spawn("/sink/a")
        await rt.spawn("/sink/gone")
        await rt.spawn("/src/s")
        await rt.run_until_idle()
        due = clock.now() + 1
        ops: list[Op] = []
        for i in range(20):
            ops.extend(arm_ops(_send(i, due + i / 1000, "/sink/gone" if i == 7 else "/sink/a")))
        await rt.store.commit(ops)
        # a one-shot send is its timer row alone: no schedule index to keep in step
        assert await rt.store.kv_scan(SCHEDULE_NS, "/src/s|") == []
        # timer 3 is cancelled (its row deleted, as cancel_schedule does); /sink/gone was killed
        key3 = timer_key(due + 3 / 1000, "/src/s", "send:m3")
        await rt.store.commit(cancel_ops("/src/s", "send:m3", key3))
        await rt.kill("/sink/gone")

        assert await fire_due(rt.store, due + 1, batch=50) == 18
        assert await _inbox(rt, "/sink/a") == [i for i in range(20) if i not in (3, 7)]
        assert await rt.store.kv_scan(TIMER_NS) == []  # the undeliverable one was dropped
        assert await fire_due(rt.store, due + 2, batch=50) == 0
        assert await _inbox(rt, "/sink/a") == [i for i in range(20) if i not in (3, 7)]


async def test_an_undecodable_timer_row_is_set_aside_and_the_rest_fire(store_url: str) -> None:
    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        due = await _sink_and_source(rt, clock)
        ops: list[Op] = []
        for i in range(10):
            ops.extend(arm_ops(_send(i, due + i / 1000, "/sink/a")))
        bad = {
            # not JSON; JSON of the wrong shape; a delayed send with a bad target URL
            timer_key(due + 0.0025, "/src/s", "send:x1"): b"\xff not json",
            timer_key(due + 0.0035, "/src/s", "send:x2"): b'{"kind": "future_send"}',
            timer_key(due + 0.0045, "/src/s", "send:x3"): _send(99, due, "/sink/a")
            .model_copy(update={"target": "no url here"})
            .dump(),
        }
        ops.extend(KvPut(TIMER_NS, key, raw) for key, raw in bad.items())
        await rt.store.commit(ops)
        assert await fire_due(rt.store, due + 1, batch=50) == 10  # the set-aside rows: not fired
        assert await _inbox(rt, "/sink/a") == list(range(10))
        assert await rt.store.kv_scan(TIMER_NS) == []
        assert dict(await rt.store.kv_scan(BAD_TIMER_NS)) == bad


async def test_one_by_one_firing_sets_bad_rows_aside_too(store_url: str) -> None:
    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        due = await _sink_and_source(rt, clock)
        key = timer_key(due, "/src/s", "send:bad")
        await rt.store.commit([*arm_ops(_send(1, due, "/sink/a")), KvPut(TIMER_NS, key, b"[]")])
        assert await fire_due(rt.store, due + 1, batch=1) == 1
        assert await _inbox(rt, "/sink/a") == [1]
        assert await rt.store.kv_scan(TIMER_NS) == []
        assert await rt.store.kv_scan(BAD_TIMER_NS) == [(key, b"[]")]
