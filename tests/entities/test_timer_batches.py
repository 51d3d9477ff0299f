"""``fire_due`` fires due timers in batches (one transaction each) and falls back to one
transaction per timer when a batch cannot commit: a cancelled or replaced timer, or a target
that is gone, must not stop the others, and nothing may fire twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from entities import HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities._records import SCHEDULE_NS, TIMER_NS
from entities._scheduler import TimerValue, arm_ops, cancel_ops, fire_due, timer_key
from streams import Op

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


async def _inbox(rt: Runtime, url: str) -> list[Any]:
    found: list[Any] = []
    offset = "-1"
    while True:
        batch, offset = await rt.read(url, offset, limit=1000)
        found.extend(e["value"]["payload"]["i"] for e in batch if e["type"] == "inbox")
        if len(batch) < 1000:
            return found


async def test_batches_fire_in_due_order_exactly_once(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with Runtime(registry, f"sqlite:///{tmp_path / 'b.db'}", clock=clock) as rt:
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
        signals = (await rt.view("/src/s"))["signals"]
        assert len(signals) == 1200 and {s["status"] for s in signals.values()} == {"sent"}


async def test_a_failing_timer_falls_back_to_one_by_one(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with Runtime(registry, f"sqlite:///{tmp_path / 'f.db'}", clock=clock) as rt:
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
