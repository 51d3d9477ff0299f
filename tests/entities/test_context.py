"""Contract tests of the HandlerContext API, run in-process on every store backend."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from pydantic import BaseModel

from entities import (
    ChildEntry,
    ContextError,
    DefinitionError,
    DuplicateEntity,
    EntityNotFound,
    EntityStopped,
    HandlerContext,
    InboxMessage,
    Registry,
    Runtime,
    SchemaValidationFailed,
    UnknownEntityType,
    VirtualClock,
    WakeEvent,
    collection,
)


class Row(BaseModel):
    key: str
    value: int = 0


class Args(BaseModel):
    start: int
    label: str = "x"


def make_runtime(registry: Registry, store_url: str, **kwargs: Any) -> Runtime:
    return Runtime(registry, store_url, clock=VirtualClock(), **kwargs)


async def test_collections_read_their_own_writes_and_commit(store_url: str) -> None:
    registry = Registry()
    seen: list[Any] = []

    @registry.define("t", state={"rows": collection(Row)})
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        rows = ctx.db.collections.rows
        assert rows.get("a") is None
        ctx.db.actions.rows_insert(row=Row(key="a", value=1))
        seen.append(rows.get("a"))
        ctx.state.rows.update("a", lambda r: Row(key="a", value=r.value + 10))
        ctx.state.rows.insert({"key": "b", "value": 2})
        ctx.db.actions.rows_delete(key="b")
        seen.append([r.value for r in rows.to_list()])
        with pytest.raises(ContextError):
            rows.insert(Row(key="a"))
        with pytest.raises(ContextError):
            rows.update("missing", Row(key="missing"))
        with pytest.raises(ContextError):
            rows.insert({"key": "c", "value": "not a number"})

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/one", initial_message={"go": 1})
        assert await rt.run_until_idle() == 1
        assert seen == [Row(key="a", value=1), [11]]
        assert await rt.state_of("/t/one") == {"rows": {"a": {"key": "a", "value": 11}}}


async def test_identity_args_tags_first_wake_and_manifest(store_url: str) -> None:
    registry = Registry()
    wakes: list[dict[str, Any]] = []
    finished: list[dict[str, Any]] = []

    @registry.define("child")
    async def child(ctx: HandlerContext, wake: WakeEvent) -> None:
        ctx.sleep()

    @registry.define("parent", args_schema=Args)
    async def parent(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.type == "wake" and wake.wakes and "finished_child" in wake.wakes[-1]:
            finished.append(wake.wakes[-1]["finished_child"])
            return
        wakes.append(
            {
                "first": ctx.first_wake,
                "url": ctx.entity_url,
                "type": ctx.entity_type,
                "args": dict(ctx.args),
                "tags": ctx.tags,
            }
        )
        with pytest.raises(TypeError):
            ctx.args["start"] = 5  # type: ignore[index]
        ctx.set_tag("phase", f"p{len(wakes)}")
        handle = await ctx.spawn("child", "c1", tags={"role": "helper"})
        assert handle.url == "/child/c1"
        assert await handle.status() in {"spawning", "idle"}

    async with make_runtime(registry, store_url) as rt:
        with pytest.raises(SchemaValidationFailed):
            await rt.spawn("/parent/p1", args={"start": "nope"})
        await rt.spawn("/parent/p1", args={"start": 3}, initial_message={"n": 1})
        await rt.run_until_idle()
        await rt.send("/parent/p1", {"n": 2})
        await rt.run_until_idle()
        assert wakes[0] == {"first": True, "url": "/parent/p1", "type": "parent",
                            "args": {"start": 3, "label": "x"}, "tags": {}}  # fmt: skip
        assert wakes[1]["first"] is False
        assert wakes[1]["tags"] == {"phase": "p1"}
        info = await rt.get("/parent/p1")
        assert info.tags == {"phase": "p2"}
        # the child's first run finished and woke the parent (spawned with run_finished)
        assert finished == [
            {
                "url": "/child/c1",
                "type": "child",
                "run_status": "completed",
                "response": None,
                "error": None,
            }
        ]
        child_info = await rt.get("/child/c1")
        assert child_info.parent == "/parent/p1"
        assert child_info.tags == {"role": "helper"}
        data = await rt.inspect("/parent/p1")
        entry = ChildEntry.model_validate(data["manifest"]["child:/child/c1"])
        assert entry.entity_url == "/child/c1"
        assert [e.url for e in await rt.list_entities(tag="phase=p2")] == ["/parent/p1"]
        assert await rt.list_entities(tag="phase=p1") == []


async def test_spawn_of_existing_url_is_an_error(store_url: str) -> None:
    registry = Registry()
    errors: list[BaseException] = []

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        if ctx.entity_id != "me":
            return
        try:
            await ctx.spawn("t", "other")
        except DuplicateEntity as exc:
            errors.append(exc)
        with pytest.raises(UnknownEntityType):
            await ctx.spawn("nope", "x")

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/other")
        await rt.spawn("/t/me", initial_message={})
        await rt.run_until_idle()
        assert len(errors) == 1
        with pytest.raises(DuplicateEntity):
            await rt.spawn("/t/me")


async def test_sends_between_entities_and_replies(store_url: str) -> None:
    registry = Registry()

    @registry.define("echo")
    async def echo(ctx: HandlerContext, wake: WakeEvent) -> None:
        for message in wake.messages:
            if message.sender and message.sender.startswith("/relay/"):
                await ctx.send(message.sender, {"echo": message.payload})

    @registry.define("relay")
    async def relay(ctx: HandlerContext, wake: WakeEvent) -> None:
        for message in wake.messages:
            if "echo" in message.payload:
                ctx.reply(message.payload["echo"])
            else:
                await ctx.send("/echo/e", message.payload)
                with pytest.raises(EntityNotFound):
                    await ctx.send("/echo/missing", {})

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/echo/e")
        await rt.spawn("/relay/r")
        assert await rt.run_until_idle() == 2  # the first wakes
        await rt.send("/relay/r", {"hello": 1})
        assert await rt.run_until_idle() == 3  # relay, echo, relay
        events, _ = await rt.read("/relay/r")
        replies = [e["value"]["value"] for e in events if e["type"] == "texts"]
        assert replies == [{"hello": 1}]


async def test_events_arriving_while_busy_are_coalesced_in_order(store_url: str) -> None:
    registry = Registry()
    batches: list[list[int]] = []

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        batches.append([m.payload["n"] for m in wake.messages])
        assert wake.event_count == len(wake.messages) + len(wake.wakes)
        assert wake.type == "message_received"
        assert wake.from_offset < wake.to_offset

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/a")
        for n in range(5):
            await rt.send("/t/a", {"n": n})
        await rt.run_until_idle()
        for n in range(5, 8):
            await rt.send("/t/a", {"n": n})
        await rt.run_until_idle()
        assert batches == [[0, 1, 2, 3, 4], [5, 6, 7]]


async def test_on_message_answers_directly_and_skips_the_handler(store_url: str) -> None:
    registry = Registry()
    handled: list[Any] = []

    def gate(ctx: HandlerContext, message: InboxMessage) -> str | None:
        return "no" if message.payload.get("blocked") else None

    @registry.define("t", on_message=gate)
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        handled.extend(m.payload for m in wake.messages)
        ctx.reply("yes")

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/a")
        blocked = await rt.send("/t/a", {"blocked": True})
        await rt.run_until_idle()
        assert handled == []
        assert await rt.replies("/t/a", blocked.key) == ["no"]
        allowed = await rt.send("/t/a", {"blocked": False})
        await rt.run_until_idle()
        assert handled == [{"blocked": False}]
        assert await rt.replies("/t/a", allowed.key) == ["yes"]


async def test_failures_retry_with_backoff_then_dead_letter_and_call_on_error(
    store_url: str,
) -> None:
    registry = Registry()
    attempts: list[int] = []

    def on_error(ctx: HandlerContext, exc: BaseException) -> None:
        ctx.reply(f"sorry: {exc}")

    @registry.define("t", state={"rows": collection(Row)}, on_error=on_error, max_attempts=3)
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        attempts.append(wake.attempt)
        ctx.state.rows.insert(Row(key="partial"))
        if wake.messages[0].payload.get("fail"):
            raise ValueError("bad input")

    clock = VirtualClock()
    async with Runtime(registry, store_url, clock=clock) as rt:
        await rt.spawn("/t/a")
        start = clock.now()
        receipt = await rt.send("/t/a", {"fail": True})
        await rt.run_until_idle()
        assert attempts == [1, 2, 3]
        assert clock.now() > start  # the virtual clock jumped over the backoff
        assert await rt.replies("/t/a", receipt.key) == ["sorry: bad input"]
        events, _ = await rt.read("/t/a")
        errors = [e["value"] for e in events if e["type"] == "errors"]
        assert [e["attempt"] for e in errors] == [1, 2, 3]
        assert errors[-1]["final"] is True
        assert "ValueError: bad input" in errors[-1]["traceback"]
        runs = [e["value"]["status"] for e in events if e["type"] == "runs"]
        assert runs == ["failed", "failed", "dead_lettered"]
        # the failed attempts' state writes were never committed
        assert await rt.state_of("/t/a") == {"rows": {}}
        # the entity stays usable
        await rt.send("/t/a", {"fail": False})
        await rt.run_until_idle()
        assert (await rt.state_of("/t/a"))["rows"] == {"partial": {"key": "partial", "value": 0}}
        info = await rt.get("/t/a")  # idle, with the dead letter of the given-up wake
        assert info.status == "failed" and info.dead_letters == 1


async def test_steps_now_and_uuid_are_journaled_across_retries(store_url: str) -> None:
    registry = Registry()
    calls: list[str] = []
    observed: list[tuple[Any, float, str]] = []

    @registry.define("t", max_attempts=2)
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        def expensive() -> dict[str, int]:
            calls.append("expensive")
            return {"answer": 42}

        result = await ctx.step("model-call", expensive)
        observed.append((result, ctx.now(), ctx.uuid()))
        with pytest.raises(ContextError):
            await ctx.step("model-call", expensive)
        if wake.attempt == 1:
            raise RuntimeError("crash after the step")

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/a", initial_message={})
        await rt.run_until_idle()
        assert calls == ["expensive"]
        assert observed[0] == observed[1]
        assert observed[0][0] == {"answer": 42}


async def test_record_run_and_sleep(store_url: str) -> None:
    registry = Registry()

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        run = ctx.record_run()
        run.attach_response("done")
        run.end("completed", finish_reason="stop")
        ctx.sleep()

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/a", initial_message={})
        await rt.run_until_idle()
        events, _ = await rt.read("/t/a")
        runs = [e["value"] for e in events if e["type"] == "runs" and ".run" in e["key"]]
        assert runs[-1]["status"] == "completed"
        assert runs[-1]["response"] == "done"


async def test_kill_stops_the_entity(store_url: str) -> None:
    registry = Registry()

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        ctx.reply("ok")

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/a")
        await rt.send("/t/a", {})
        await rt.kill("/t/a")
        assert await rt.run_until_idle() == 0
        assert (await rt.get("/t/a")).status == "stopped"
        with pytest.raises(EntityStopped):
            await rt.send("/t/a", {})


def test_registry_rules() -> None:
    registry = Registry()

    @registry.define("t", description="d")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        return None

    with pytest.raises(DefinitionError):
        registry.define("t", handler=handler)
    with pytest.raises(DefinitionError):
        collection(Row, primary_key="nope")
    with pytest.raises(UnknownEntityType):
        registry.get("missing")
    assert [t.name for t in registry.list()] == ["t"]
    assert registry.get("t").describe()["description"] == "d"


async def test_typed_inbox_validates_at_send_time(store_url: str) -> None:
    class Ping(BaseModel):
        n: int

    class Stop(BaseModel):
        reason: str

    registry = Registry()

    @registry.define("t", inbox={"ping": Ping, "stop": Stop})
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        return None

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/a")
        await rt.send("/t/a", {"n": 1}, type="ping")
        with pytest.raises(SchemaValidationFailed):
            await rt.send("/t/a", {"n": "x"}, type="ping")
        with pytest.raises(SchemaValidationFailed):
            await rt.send("/t/a", {"n": 1}, type="unknown")
        events, _ = await rt.read("/t/a")
        assert [e["value"]["message_type"] for e in events if e["type"] == "inbox"] == ["ping"]


async def test_queue_depth_counts_waiting_wake_events(store_url: str) -> None:
    registry = Registry()

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        return None

    async with make_runtime(registry, store_url) as rt:
        await rt.spawn("/t/q")
        for n in range(3):
            await rt.send("/t/q", {"n": n})
        assert (await rt.get("/t/q")).queue == 4  # the first wake and three messages
        assert [e.queue for e in await rt.list_entities(type="t")] == [4]
        await rt.run_until_idle()
        info = await rt.get("/t/q")
        assert info.queue == 0 and not info.pending


async def test_a_finished_wake_leaves_no_reference_cycle() -> None:
    """A wake's context (its state, actions, run book) is freed by reference counting when the
    wake ends, not left for the cycle collector (which then ran every few wakes and cost the
    wake path a tenth of its CPU)."""
    registry = Registry()

    @registry.define("t", state={"rows": collection(Row)})
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        rows = ctx.db.collections.rows
        for message in wake.messages:
            current = rows.get("a")
            if current is None:
                ctx.db.actions.rows_insert(row=Row(key="a", value=1))
            else:
                ctx.db.actions.rows_update(key="a", updater=Row(key="a", value=current.value + 1))
            ctx.reply(rows.get("a").value, to=message)
            ended = ctx.record_run()
            ended.attach_response("text")
            ended.end(usage=(1, 2))
            ctx.record_run()  # left open: ended by the wake's commit
            ctx.now()

    async with make_runtime(registry, "memory://") as rt:
        for i in range(5):
            await rt.spawn(f"/t/e{i}")
            await rt.send(f"/t/e{i}", {})
        await rt.run_until_idle()
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(5):
                await rt.send(f"/t/e{i}", {})
            assert await rt.run_until_idle() == 5
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert "HandlerContext" not in left
    assert "Database" not in left
    assert "RunBook" not in left


async def test_a_spawn_answers_with_the_entity_as_it_created_it(store_url: str) -> None:
    """What a spawn returns is the entity its commit created (idle, pending, its tags and
    queued wakes), exactly what a lookup reads before the first wake, and not a read that
    may already find that wake running; an idempotent retry answers the same."""
    registry = Registry()

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        return None

    async with make_runtime(registry, store_url) as rt:
        plain = await rt.spawn("/t/a")
        assert plain == await rt.get("/t/a")
        assert plain.status == "idle" and plain.pending and plain.queue == 1
        full = await rt.spawn(
            "/t/b", tags={"team": "x", "tier": "1"}, initial_message={"hi": 1},
            idempotency_key="spawn-b",
        )  # fmt: skip
        assert full == await rt.get("/t/b")
        assert full.tags == {"team": "x", "tier": "1"} and full.queue == 2
        again = await rt.spawn(
            "/t/b", tags={"team": "x", "tier": "1"}, initial_message={"hi": 1},
            idempotency_key="spawn-b",
        )  # fmt: skip
        assert again.to_json() == full.to_json()  # as the first answered (JSON, kept a day)
        await rt.run_until_idle()
        assert (await rt.get("/t/b")).status == "idle" and not (await rt.get("/t/b")).pending
