"""What a long history costs: an entity with 100,000 events against a fresh one, on SQLite.

    python benchmarks/history.py [--quick] [--events N]

The long entity's history is written straight through the store in large batches (a realistic
mix per turn: the inbox message, a dozen streamed ``text_deltas``, the reply in ``texts``, a
state row and the ``runs`` row, with offsets as the runtime writes them), its record
acknowledges it all and its snapshot is stored as a wake's commit would store it. Then both
entities get the same real work through one :class:`~entities.Runtime`:

- ``wake_ms``: send a message and run the wake (send to committed reply), median;
- ``inspect_ms``: :meth:`~entities.Runtime.inspect`, median;
- ``reply_wait_ms``: finding the replies of a message just answered with the default
  ``after=-1`` (:meth:`~entities.Runtime.outcome`, what ``GET .../replies/{key}`` and a reply
  wait poll), median;
- ``timeline_ms``: ``ctx.timeline_messages(last=20)`` inside a wake, median.

The ``*_ratio`` fields are long / fresh (target: each at most 2). ``full_view_ms`` is the full
fold of the long entity's stream (``Runtime.view``, kept for debugging), for scale. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entities import HandlerContext, Registry, Runtime, WakeEvent, collection
from entities._events import event
from entities._pipeline.inbox import message_event
from entities._pipeline.load import snapshot, view_fold
from entities._records import ENTITY_NS, SNAPSHOT_NS, EntityRecord
from streams import format_offset

registry = Registry()
timeline_s: list[float] = []


class Note(BaseModel):
    key: str
    n: int = 0


@registry.define("hist", state={"notes": collection(Note)})
async def hist(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        payload = message.payload or {}
        if payload.get("timeline"):
            began = time.perf_counter()
            window = await ctx.timeline_messages(last=20)
            timeline_s.append(time.perf_counter() - began)
            assert window, "an empty timeline"
        ctx.state.notes.upsert(Note(key="last", n=int(payload.get("n", 0))))
        ctx.reply({"n": payload.get("n")}, to=message)


def _turn(position: int, n: int, now: float) -> list[bytes]:
    """One synthetic turn whose inbox message lands at ``position + 1``: the message, its
    streamed deltas, the reply, a state row and the run, as a wake writes them."""
    key = f"h{n:07d}"
    wake_id = f"w{position}-{position + 1}"
    deltas = [
        event("text_deltas", f"{wake_id}.{key}.{i}",
              {"run_id": wake_id, "in_reply_to": key, "seq": i, "delta": f"token {i} "}, now)
        for i in range(12)
    ]  # fmt: skip
    run = {
        "status": "completed", "wake_id": wake_id, "attempt": 1,
        "from_offset": format_offset(position), "to_offset": format_offset(position + 1),
        "event_count": 1, "duration_ms": 1.0, "error": None, "epoch": 1, "worker": "bench",
    }  # fmt: skip
    return [
        message_event(key, {"n": n, "text": f"question {n}"}, None, None, now),
        *deltas,
        event("runs", wake_id, run, now, txid=wake_id),
        event("state:notes", "last", {"key": "last", "n": n}, now, "upsert"),
        event("texts", f"{wake_id}:0",
              {"run_id": wake_id, "in_reply_to": key, "value": f"answer {n}"}, now),
    ]  # fmt: skip


async def build_history(rt: Runtime, url: str, events: int) -> int:
    """Give the (spawned, idle) entity at ``url`` about ``events`` events of history, written
    through the store in batches, then acknowledge them and store its snapshot as a wake's
    commit would. Returns the stream's length."""
    stream = url.strip("/") + "/main"
    head = await rt.store.head(stream)
    position = int(head.next_offset.rsplit("_", 1)[1])
    now, n, batch = time.time(), 0, []
    while position + len(batch) < events:
        turn = _turn(position + len(batch), n, now)
        batch.extend(turn)
        n += 1
        if len(batch) >= 5000:
            await rt.store.append(stream, batch)
            position, batch = position + len(batch), []
    if batch:
        await rt.store.append(stream, batch)
        position += len(batch)
    tail = format_offset(position)
    fold = view_fold()  # setup only: the snapshot the runtime's wakes would have stored
    offset = "-1"
    while True:
        result = await rt.store.read(stream, offset, limit=5000, renew_ttl=False)
        for message in result.messages:
            fold.apply_bytes(message.data)
        offset = result.next_offset
        if result.up_to_date or not result.messages:
            break
    raw = await rt.store.kv_get(ENTITY_NS, url)
    assert raw is not None
    record = EntityRecord.load(raw).model_copy(update={"acked": tail})
    await rt.store.kv_put(ENTITY_NS, url, record.dump())
    await rt.store.kv_put(SNAPSHOT_NS, url, snapshot(fold.collections, tail))
    return position


async def measure(rt: Runtime, urls: tuple[str, ...], rounds: int) -> dict[str, dict[str, float]]:
    """The medians of each entity (see the module docstring), the entities taking turns in
    every round so that both see the same machine."""
    samples: dict[str, dict[str, list[float]]] = {u: {} for u in urls}

    async def timed(url: str, name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        began = time.perf_counter()
        await fn()
        samples[url].setdefault(name, []).append(time.perf_counter() - began)

    for i in range(rounds):
        for url in urls:

            async def wake(url: str = url, i: int = i) -> None:
                await rt.send(url, {"n": i})
                await rt.run_until_idle()

            await timed(url, "wake", wake)
            await timed(url, "inspect", partial(rt.inspect, url))
            key = (await rt.send(url, {"n": 10_000 + i})).key
            await rt.run_until_idle()

            async def reply_wait(url: str = url, key: str = key) -> None:
                found = await rt.outcome(url, key)
                assert found.replies, "no reply found"

            await timed(url, "reply_wait", reply_wait)
            timeline_s.clear()
            await rt.send(url, {"n": 20_000 + i, "timeline": True})
            await rt.run_until_idle()
            samples[url].setdefault("timeline", []).extend(timeline_s)
    return {
        url: {f"{name}_ms": round(statistics.median(values) * 1000, 3)
              for name, values in by_name.items()}
        for url, by_name in samples.items()
    }  # fmt: skip


async def main(quick: bool, events: int) -> dict[str, Any]:
    rounds = 10 if quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'history.db'}"
        async with Runtime(registry, db) as rt:
            await rt.spawn("/hist/long")
            await rt.spawn("/hist/fresh")
            await rt.run_until_idle()
            began = time.perf_counter()
            length = await build_history(rt, "/hist/long", events)
            build_s = time.perf_counter() - began
        # a new runtime: no cached views, as after a restart
        async with Runtime(registry, db) as rt:
            for i in range(5):  # warm-up (the long entity's first wake loads its snapshot)
                for url in ("/hist/fresh", "/hist/long"):
                    await rt.send(url, {"n": -i})
                    await rt.run_until_idle()
            medians = await measure(rt, ("/hist/fresh", "/hist/long"), rounds)
            fresh, long = medians["/hist/fresh"], medians["/hist/long"]
            began = time.perf_counter()
            await rt.view("/hist/long")
            full_view_ms = round((time.perf_counter() - began) * 1000, 1)
    figures: dict[str, Any] = {"events": length, "rounds": rounds, "build_s": round(build_s, 2)}
    for name in ("wake", "inspect", "reply_wait", "timeline"):
        figures[f"{name}_ms_long"] = long[f"{name}_ms"]
        figures[f"{name}_ms_fresh"] = fresh[f"{name}_ms"]
        figures[f"{name}_ratio"] = round(long[f"{name}_ms"] / max(fresh[f"{name}_ms"], 1e-6), 2)
    figures["full_view_ms"] = full_view_ms
    figures["target_met"] = all(
        figures[f"{n}_ratio"] <= 2 for n in ("wake", "inspect", "reply_wait", "timeline")
    )
    return figures


def _compaction_figures(quick: bool) -> dict[str, Any]:
    # ---- compaction_saving: measured by benchmarks/_compaction.py (retention work) ----------
    # ``measure(quick) -> dict`` gives ``compaction_saving`` (and its details) when the module
    # is there; until then the figure is absent.
    try:
        import _compaction  # type: ignore[import-not-found]
    except ImportError:
        return {}
    result: dict[str, Any] = _compaction.measure(quick)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (well under a minute)")
    parser.add_argument("--events", type=int, default=100_000, help="events of the long entity")
    options = parser.parse_args()
    figures = anyio.run(main, options.quick, options.events)
    figures.update(_compaction_figures(options.quick))
    print(f"long entity: {figures['events']:,} events (built in {figures['build_s']} s)")
    print(f"{'median':<14}{'fresh ms':>12}{'long ms':>12}{'ratio':>8}")
    for name in ("wake", "inspect", "reply_wait", "timeline"):
        print(
            f"{name:<14}{figures[f'{name}_ms_fresh']:>12}{figures[f'{name}_ms_long']:>12}"
            f"{figures[f'{name}_ratio']:>8}"
        )
    print(f"full fold of the long stream (Runtime.view): {figures['full_view_ms']} ms")
    print(json.dumps(figures))
