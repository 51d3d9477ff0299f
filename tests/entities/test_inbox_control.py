"""Inbox control: a queued message can be cancelled or edited until a wake takes it (then
409), over Python and HTTP; wakes, reply waits, the agent's timeline and a claim racing the
change all see the same."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx2
import pytest
from pydantic import BaseModel

from entities import (
    HandlerContext,
    MessageNotQueued,
    Registry,
    Runtime,
    SchemaValidationFailed,
    VirtualClock,
    WakeEvent,
    collection,
)
from entities._records import ENTITY_NS, PENDING_NS
from entities._urls import parse_url
from entities.agent._window import timeline
from entities.server import create_app
from tests._live import serving


class Add(BaseModel):
    add: int
    hold: bool = False


class Total(BaseModel):
    key: str
    value: int = 0


registry = Registry()
seen: list[list[Any]] = []
gate = {"event": anyio.Event()}


@registry.define("counter", inbox=Add, state={"totals": collection(Total)})
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    seen.append([m.payload["add"] for m in wake.messages])
    totals = ctx.db.collections.totals
    for message in wake.messages:
        if message.payload.get("hold"):
            await gate["event"].wait()
        row = totals.get("total") or Total(key="total")
        totals.upsert(Total(key="total", value=row.value + message.payload["add"]))
        ctx.reply(totals.get("total").value, to=message)


async def until(check: Callable[[], Any]) -> None:
    """Poll ``check`` until it is true; an awaitable's result counts: an outcome with
    replies."""
    while True:
        found = check()
        if hasattr(found, "__await__"):
            found = (await found).replies
        if found:
            return
        await anyio.sleep(0.01)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    seen.clear()
    gate["event"] = anyio.Event()


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        await runtime.spawn("/counter/c")
        await runtime.run_until_idle()
        seen.clear()
        yield runtime


async def test_a_cancelled_message_is_never_delivered(rt: Runtime) -> None:
    a = await rt.send("/counter/c", {"add": 1})
    b = await rt.send("/counter/c", {"add": 2})
    await rt.cancel_message("/counter/c", a.key)
    assert (await rt.get("/counter/c")).queue == 1
    with pytest.raises(MessageNotQueued, match="not queued"):
        await rt.cancel_message("/counter/c", a.key)  # cancelled already
    with pytest.raises(MessageNotQueued):
        await rt.cancel_message("/counter/c", "never-sent")
    await rt.run_until_idle()
    assert seen == [[2]]
    outcome = await rt.outcome("/counter/c", a.key)
    assert (outcome.status, outcome.replies, outcome.failed) == ("cancelled", [], True)
    assert await rt.replies("/counter/c", b.key) == [2]
    with pytest.raises(MessageNotQueued):
        await rt.cancel_message("/counter/c", b.key)  # taken
    with pytest.raises(MessageNotQueued):
        await rt.edit_message("/counter/c", b.key, {"add": 9})


async def test_a_wake_whose_messages_were_all_cancelled_runs_no_handler(rt: Runtime) -> None:
    a = await rt.send("/counter/c", {"add": 1})
    await rt.cancel_message("/counter/c", a.key)
    await rt.run_until_idle()
    assert seen == []
    info = await rt.get("/counter/c")
    assert (info.pending, info.queue) == (False, 0)


async def test_an_edited_message_is_delivered_with_its_new_payload(rt: Runtime) -> None:
    a = await rt.send("/counter/c", {"add": 1})
    b = await rt.send("/counter/c", {"add": 2})
    row = await rt.edit_message("/counter/c", a.key, {"add": 10})
    assert row["payload"] == {"add": 10, "hold": False} and row["edited_at"] > 0
    with pytest.raises(SchemaValidationFailed):
        await rt.edit_message("/counter/c", a.key, {"add": "many"})
    await rt.edit_message("/counter/c", a.key, {"add": 20})  # edited twice: the last counts
    await rt.run_until_idle()
    assert seen == [[20, 2]]  # in its place, before b
    assert await rt.replies("/counter/c", a.key) == [20]
    assert await rt.replies("/counter/c", b.key) == [22]


async def test_a_change_racing_a_claim_fences_the_claim(rt: Runtime) -> None:
    """A claim that loaded its range before the change cannot commit it: the change rewrote
    the record the claim checks (no wake was in flight)."""
    a = await rt.send("/counter/c", {"add": 1})
    worker = rt.worker()
    target = parse_url("/counter/c")
    raw = await rt.store.kv_get(ENTITY_NS, target.url)
    token = await rt.store.kv_get(PENDING_NS, target.url)
    assert raw is not None and token is not None
    await rt.cancel_message("/counter/c", a.key)
    stale = await worker.claimer._try(target, raw, token)
    assert stale is not None and not hasattr(stale, "record")  # _STALE: refused
    await rt.run_until_idle()
    assert seen == []


async def test_while_a_wake_runs_its_messages_are_taken_and_later_ones_can_change(
    store_url: str,
) -> None:
    async with Runtime(registry, store_url) as rt, anyio.create_task_group() as tg:
        await rt.spawn("/counter/r")
        stop = anyio.Event()
        tg.start_soon(rt.worker(poll_interval=0.05).run, stop)
        held = await rt.send("/counter/r", {"add": 1, "hold": True})
        with anyio.fail_after(10):
            await until(lambda: [1] in seen)
        later = await rt.send("/counter/r", {"add": 5})
        with pytest.raises(MessageNotQueued):
            await rt.cancel_message("/counter/r", held.key)  # in flight
        await rt.edit_message("/counter/r", later.key, {"add": 7})  # no fence of the wake
        gate["event"].set()
        with anyio.fail_after(10):
            await until(lambda: rt.outcome("/counter/r", later.key))
        assert await rt.replies("/counter/r", held.key) == [1]
        assert await rt.replies("/counter/r", later.key) == [8]
        stop.set()


def test_the_timeline_shows_edits_and_drops_cancelled_messages() -> None:
    def inbox(key: str, text: str, operation: str = "insert") -> dict[str, Any]:
        item: dict[str, Any] = {"type": "inbox", "key": key, "headers": {"operation": operation}}
        if operation != "delete":
            item["value"] = {"payload": {"text": text}}
        return item

    events = [
        inbox("a", "first"),
        {"type": "texts", "key": "r", "value": {"value": "answer"}},
        inbox("b", "typo"),
        inbox("c", "never mind"),
        inbox("b", "fixed", "update"),
        inbox("c", "", "delete"),
    ]
    messages = timeline(events)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "first"),
        ("assistant", "answer"),
        ("user", "fixed"),
    ]


async def test_inbox_control_over_http(store_url: str) -> None:
    async with Runtime(registry, store_url) as runtime:
        await runtime.spawn("/counter/h")
        a = await runtime.send("/counter/h", {"add": 1})
        b = await runtime.send("/counter/h", {"add": 2})
        async with serving(create_app(runtime)) as base:
            async with httpx2.AsyncClient(base_url=base) as http:
                path = "/_entities/entities/counter/h/inbox/"
                edited = await http.patch(path + a.key, json={"payload": {"add": 4}})
                assert edited.status_code == 200 and edited.json()["payload"]["add"] == 4
                bad = await http.patch(path + a.key, json={"payload": {"add": "x"}})
                assert bad.status_code == 422
                gone = await http.delete(path + b.key)
                assert gone.status_code == 200 and gone.json() == {"key": b.key, "cancelled": True}
                again = await http.delete(path + b.key)
                assert again.status_code == 409
                assert again.json()["error"]["code"] == "MESSAGE_NOT_QUEUED"
                none = await http.delete("/_entities/entities/counter/zz/inbox/k")
                assert none.status_code == 404
        await runtime.run_until_idle()
        assert await runtime.replies("/counter/h", a.key) == [4]
        assert (await runtime.outcome("/counter/h", b.key)).status == "cancelled"
