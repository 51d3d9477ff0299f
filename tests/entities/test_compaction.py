"""Compaction on every backend: the text deltas of ended agent runs go, old journal steps go
(replay then says so), the prefix before an old snapshot goes with ``keep_for``; what the entity
sees, its replies and replays within the window stay the same; the CLI and periodic rounds."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from pydantic import BaseModel

from entities import (
    HandlerContext,
    JournalCompacted,
    Registry,
    Retention,
    Runtime,
    VirtualClock,
    WakeEvent,
    collection,
)
from entities._compaction import compact_round
from entities.agent import ScriptRequest
from entities.server import create_app
from entities.server._prometheus import render
from streams import OffsetGone, open_store
from tests._live import serving
from tests.conformance.run import ensure_node_modules

DAY = 24 * 3600.0
seen_history: list[list[str]] = []


def script(request: ScriptRequest) -> Any:
    seen_history.append([str(m.content) for m in request.messages])
    return f"answer number {len(request.messages)} with several streamed words"


class Count(BaseModel):
    key: str
    n: int


registry = Registry()


@registry.define("chat")
async def chat(ctx: HandlerContext, wake: WakeEvent) -> None:
    if wake.messages:
        ctx.use_agent("sys", test_responses=script, history=20)
        await ctx.agent.run()


@registry.define(
    "counter", state={"counts": collection(Count)}, retention=Retention(keep_for=3600.0)
)
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    for _message in wake.messages:
        row = ctx.state.counts.get("c")
        ctx.state.counts.upsert(Count(key="c", n=(row.n if row else 0) + 1))
    row = ctx.state.counts.get("c")
    if wake.messages:
        ctx.reply({"n": row.n if row else 0})


async def events(rt: Runtime, url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    offset = "-1"
    while True:
        batch, offset = await rt.read(url, offset, limit=1000)
        out.extend(batch)
        if len(batch) < 1000:
            return out


async def test_ended_runs_lose_their_deltas_and_nothing_else_changes(store_url: str) -> None:
    seen_history.clear()
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        await rt.spawn("/chat/a")
        first = await rt.send("/chat/a", {"text": "hello"})
        await rt.run_until_idle()
        second = await rt.send("/chat/a", {"text": "again"})
        await rt.run_until_idle()
        before = await events(rt, "/chat/a")
        deltas = [e for e in before if e["type"] == "text_deltas"]
        assert len(deltas) > 4
        view = await rt.view("/chat/a")
        replies = [await rt.outcome("/chat/a", r.key, after=r.offset) for r in (first, second)]

        report = await rt.compact("/chat/a")
        assert report.text_deltas == len(deltas) and report.steps == 0 and report.prefix == 0
        assert report.bytes == sum(len(orjson.dumps(_raw(e))) for e in deltas)
        after = await events(rt, "/chat/a")
        assert not [e for e in after if e["type"] == "text_deltas"]
        # every survivor kept its offset
        assert after == [e for e in before if e["type"] != "text_deltas"]
        assert await rt.view("/chat/a") == {k: v for k, v in view.items() if k != "text_deltas"}
        again = [await rt.outcome("/chat/a", r.key, after=r.offset) for r in (first, second)]
        assert [(o.replies, o.status) for o in again] == [(o.replies, o.status) for o in replies]
        assert (await rt.replay("/chat/a")).ok
        assert (await rt.compact("/chat/a")).events == 0  # nothing left to remove
        exported = render().decode()
        assert 'entities_compacted_events_total{kind="text_deltas",type="chat"}' in exported
        assert 'entities_compacted_bytes_total{type="chat"}' in exported

        # the next turn's history (timeline_messages) is the same conversation
        seen_history.clear()
        await rt.send("/chat/a", {"text": "third"})
        await rt.run_until_idle()
        history = seen_history[-1]
        assert any("hello" in m for m in history) and any("again" in m for m in history)
        assert sum("answer number" in m for m in history) == 2


def _raw(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "offset"}


async def test_journal_steps_older_than_the_window_go(store_url: str) -> None:
    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        await rt.spawn("/chat/j")
        await rt.send("/chat/j", {"text": "old"})
        await rt.run_until_idle()
        steps = [e for e in await events(rt, "/chat/j") if e["type"] == "steps"]
        assert steps
        report = await rt.compact("/chat/j")
        assert report.steps == 0  # within the window: the journal stays
        assert (await rt.replay("/chat/j")).ok

        clock.advance(8 * DAY)
        await rt.send("/chat/j", {"text": "new"})
        await rt.run_until_idle()
        report = await rt.compact("/chat/j")
        assert report.steps == len(steps)
        left = [e for e in await events(rt, "/chat/j") if e["type"] == "steps"]
        assert left and all(e["value"]["wake_id"] != steps[0]["value"]["wake_id"] for e in left)
        replayed = await rt.replay("/chat/j")
        old = [w for w in replayed.wakes if w.compacted]
        assert old and "journal was compacted" in (old[0].compacted or "")
        assert all(w.ok for w in replayed.wakes)
        assert any(w.compacted is None and w.ok for w in replayed.wakes)  # the recent one
        with pytest.raises(JournalCompacted, match="journal was compacted"):
            await rt.replay("/chat/j", wake=old[0].wake_id)


async def test_prefix_before_an_old_snapshot_is_truncated(shared_store_url: str) -> None:
    clock = VirtualClock()
    async with Runtime(registry, shared_store_url, clock=clock, snapshot_every=5) as rt:
        await rt.spawn("/counter/c")
        first = await rt.send("/counter/c", {"x": 1})
        for i in range(2):  # wakes of 6 messages: each stores a snapshot (snapshot_every=5)
            for _ in range(6 - (i == 0)):
                await rt.send("/counter/c", {"x": 1})
            await rt.run_until_idle()
        assert (await rt.compact("/counter/c")).prefix == 0  # the snapshot is recent
        clock.advance(2 * 3600)
        report = await rt.compact("/counter/c")
        assert report.prefix > 0 and "/counter/c" in report.truncated
        cut = report.truncated["/counter/c"]
        info = await rt.store.head("counter/c/main")
        assert info.retained_from == cut
        with pytest.raises(OffsetGone):
            await rt.store.read("counter/c/main", "0000000000000000_0000000000000001")
        state = (await rt.state_of("/counter/c"))["counts"]
        assert state == {"c": {"key": "c", "n": 12}}  # the view starts from the cut's snapshot
        # a reply wait from before the cut searches what is left
        assert (await rt.outcome("/counter/c", first.key, after=first.offset)).replies == []
        # the entity goes on from its snapshot: its state is whole
        receipt = await rt.send("/counter/c", {"x": 1})
        await rt.run_until_idle()
        assert (await rt.outcome("/counter/c", receipt.key, after=receipt.offset)).replies == [
            {"n": 13}
        ]
        # a fresh runtime (no cached views) folds from the snapshot too
    async with Runtime(registry, shared_store_url, clock=clock, snapshot_every=5) as fresh:
        receipt = await fresh.send("/counter/c", {"x": 1})
        await fresh.run_until_idle()
        assert (await fresh.outcome("/counter/c", receipt.key, after=receipt.offset)).replies == [
            {"n": 14}
        ]
        replayed = await fresh.replay("/counter/c")
        assert all(w.ok for w in replayed.wakes)
        assert replayed.wakes[-1].compacted is None  # wakes after the cut replay from its base
        assert len(replayed.wakes) >= 2


async def test_a_worker_compacts_periodically(shared_store_url: str) -> None:
    async with Runtime(registry, shared_store_url, compact_every=0.2) as rt:
        stop = anyio.Event()
        worker = rt.worker(poll_interval=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            await rt.spawn("/chat/p", initial_message={"text": "hi"})
            seen = False  # deltas were there (they may land just after the texts row)
            with anyio.fail_after(20):
                while True:
                    found = await events(rt, "/chat/p")
                    deltas = any(e["type"] == "text_deltas" for e in found)
                    seen = seen or deltas
                    texts = any(e["type"] == "texts" for e in found)
                    # (and the round that removed them ended)
                    if seen and not deltas and texts and worker.compactions:
                        break
                    await anyio.sleep(0.02)
            stop.set()


async def test_cli_compact_over_http(shared_store_url: str) -> None:
    async with Runtime(registry, shared_store_url) as rt, serving(create_app(rt)) as base:
        await rt.spawn("/chat/cli")
        await rt.send("/chat/cli", {"text": "hello"})
        await rt.run_until_idle()
        deltas = [e for e in await events(rt, "/chat/cli") if e["type"] == "text_deltas"]
        cli = [sys.executable, "-m", "entities.cli", "compact"]
        done = await anyio.run_process([*cli, "/chat/cli", "--server", base, "-o", "json"])
        answer = orjson.loads(done.stdout)
        assert answer["text_deltas"] == len(deltas) and answer["events"] == len(deltas)
        assert answer["bytes"] > 0
        done = await anyio.run_process([*cli, "--all", "--server", base])
        assert done.stdout.decode().startswith("removed 0 events")
        bad = await anyio.run_process([*cli, "--server", base], check=False)
        assert bad.returncode != 0 and b"Traceback" not in bad.stderr
        # a Durable Streams reader of the compacted stream: offsets as before, no deltas
        async with httpx2.AsyncClient(timeout=10) as http:
            got = await http.get(f"{base}/v1/stream/chat/cli/main", params={"offset": "-1"})
        assert got.status_code == 200
        assert not [e for e in got.json() if e["type"] == "text_deltas"]
        assert any(e["type"] == "texts" for e in got.json())


CONFORMANCE = Path(__file__).resolve().parents[1] / "conformance"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node (the official client)")
async def test_the_official_client_reads_a_compacted_entity_stream(shared_store_url: str) -> None:
    await anyio.to_thread.run_sync(ensure_node_modules)  # the pinned suite holds the client
    clock = VirtualClock()
    async with (
        Runtime(registry, shared_store_url, clock=clock, snapshot_every=5) as rt,
        serving(create_app(rt)) as base,
    ):
        await rt.spawn("/counter/o")
        for _ in range(2):
            for _ in range(6):
                await rt.send("/counter/o", {"x": 1})
            await rt.run_until_idle()
        await rt.spawn("/chat/o")
        await rt.send("/chat/o", {"text": "hello"})
        await rt.run_until_idle()
        before = {url: await events(rt, url) for url in ("/counter/o", "/chat/o")}
        clock.advance(2 * 3600)
        report = await rt.compact()
        assert report.prefix > 0 and report.text_deltas > 0
        cut = report.truncated["/counter/o"]

        async def official(url: str, offset: str) -> dict[str, Any]:
            done = await anyio.run_process(
                ["node", "read_stream.mjs", f"{base}/v1/stream{url}/main", offset], cwd=CONFORMANCE
            )
            answer: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
            return answer

        chat = await official("/chat/o", "-1")
        expected = [_raw(e) for e in before["/chat/o"] if e["type"] != "text_deltas"]
        assert chat["items"] == expected and chat["upToDate"] is True
        counter = await official("/counter/o", "-1")
        kept = [_raw(e) for e in before["/counter/o"] if e["offset"] > cut]
        assert counter["items"] == kept
        assert counter["offset"] == before["/counter/o"][-1]["offset"]
        gone = await official("/counter/o", before["/counter/o"][0]["offset"])
        assert gone.get("status") == 410, gone


async def test_periodic_rounds_take_turns_and_continue(shared_store_url: str) -> None:
    policies = {"chat": Retention()}
    async with Runtime(registry, shared_store_url) as rt:
        for i in range(5):
            await rt.spawn(f"/chat/r{i}")
            await rt.send(f"/chat/r{i}", {"text": "hi"})
        await rt.run_until_idle()
        async with open_store(shared_store_url) as other:
            now = rt.clock.now()
            one, two = await asyncio.gather(
                compact_round(rt.store, policies, now, "w1", entities=2),
                compact_round(other, policies, now, "w2", entities=2),
            )
            assert (one is None) != (two is None)  # one round at a time
            # another worker continues after the first two entities, and so on to the end
            done = [r for r in (one, two) if r is not None]
            while len(done) < 4:
                report = await compact_round(other, policies, rt.clock.now(), "w2", entities=2)
                assert report is not None
                done.append(report)
        assert sum(r.entities for r in done) == 5
        for i in range(5):
            assert not [e for e in await events(rt, f"/chat/r{i}") if e["type"] == "text_deltas"]
