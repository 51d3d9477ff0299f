"""The registry on its own: defining types, their schemas and hooks, and running a type's code
for one wake (``EntityType.invoke``)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from entities import (
    DefinitionError,
    HandlerContext,
    InboxMessage,
    InvalidEntityURL,
    Registry,
    Runtime,
    SchemaValidationFailed,
    UnknownEntityType,
    WakeEvent,
    collection,
)
from entities._urls import parse_url


class Item(BaseModel):
    key: str
    qty: int = 1


class Add(BaseModel):
    add: int


class Args(BaseModel):
    size: int


async def nothing(ctx: HandlerContext, wake: WakeEvent) -> None:
    return None


def test_define_as_a_decorator_or_with_handler() -> None:
    registry = Registry()

    @registry.define("cart", description="A cart", state={"items": collection(Item)})
    async def cart(ctx: HandlerContext, wake: WakeEvent) -> None:
        return None

    defined = registry.define("plain", handler=nothing, max_attempts=5)
    assert registry.get("cart").handler is cart and registry.get("cart").description == "A cart"
    assert defined is registry.get("plain") and defined.max_attempts == 5
    assert [t.name for t in registry.list()] == ["cart", "plain"]
    assert "cart" in registry and "nope" not in registry and len(registry) == 2


def test_bad_definitions_are_refused() -> None:
    registry = Registry()
    registry.define("cart", handler=nothing)
    with pytest.raises(DefinitionError, match="already defined"):
        registry.define("cart", handler=nothing)
    with pytest.raises(InvalidEntityURL):
        registry.define("no/slash", handler=nothing)
    with pytest.raises(DefinitionError, match="max_attempts"):
        registry.define("x", handler=nothing, max_attempts=0)
    with pytest.raises(DefinitionError, match="no field 'id'"):
        collection(Item, primary_key="id")
    with pytest.raises(DefinitionError, match="non-empty list"):
        registry.define_process("p", command=[])
    with pytest.raises(UnknownEntityType) as caught:
        registry.get("missing")
    assert caught.value.code == "UNKNOWN_ENTITY_TYPE" and caught.value.status == 404


def test_args_and_messages_are_validated_against_their_schemas() -> None:
    registry = Registry()
    typed = registry.define("typed", handler=nothing, args_schema=Args, inbox=Add)
    many = registry.define("many", handler=nothing, inbox={"add": Add, "item": Item})
    free = registry.define("free", handler=nothing)
    assert typed.validate_args({"size": "3"}) == {"size": 3}
    assert free.validate_args(None) == {} and free.validate_args({"a": 1}) == {"a": 1}
    with pytest.raises(SchemaValidationFailed) as caught:
        typed.validate_args({"size": "big"})
    assert caught.value.errors[0]["loc"] == ["size"]
    with pytest.raises(SchemaValidationFailed, match="JSON object"):
        free.validate_args([1])
    assert typed.validate_message({"add": 2}, None) == {"add": 2}
    assert many.validate_message({"key": "k"}, "item") == {"key": "k", "qty": 1}
    with pytest.raises(SchemaValidationFailed, match="accepts message types add, item"):
        many.validate_message({"add": 1}, "remove")
    assert free.validate_message("anything", None) == "anything"


def test_describe_gives_the_schemas() -> None:
    registry = Registry()
    described = registry.define(
        "cart", handler=nothing, state={"items": collection(Item)}, inbox=Add
    ).describe()
    assert described["name"] == "cart" and described["args_schema"] is None
    assert described["inbox_schema"]["properties"] == {"add": {"title": "Add", "type": "integer"}}
    assert described["state"] == {"items": {"type": "state:items", "primary_key": "key"}}


def message(key: str, payload: Any) -> InboxMessage:
    return InboxMessage(key=key, payload=payload, sender="test")


def wake_of(*messages: InboxMessage) -> WakeEvent:
    return WakeEvent(
        source="test",
        type="message_received",
        from_offset="-1",
        to_offset="-1",
        event_count=len(messages),
        payload=messages[-1].payload,
        summary="message",
        full_ref="",
        messages=messages,
        wake_id="w0-2",
    )


async def invoke(registry: Registry, name: str, wake: WakeEvent) -> HandlerContext:
    async with Runtime(registry) as rt:
        entity_type = registry.get(name)
        ctx = HandlerContext(
            host=rt,
            entity_type=entity_type,
            url=parse_url(f"/{name}/one"),
            view={},
            wake=wake,
            events=[],
            journal={},
            run_id=wake.wake_id,
            flush=lambda changes: None,
        )
        await entity_type.invoke(ctx, wake)
        return ctx


async def test_on_message_answers_before_the_handler_sees_the_rest() -> None:
    registry = Registry()
    seen: list[list[str]] = []

    def gate(ctx: HandlerContext, msg: InboxMessage) -> Any:
        return {"refused": msg.key} if msg.payload == "bad" else None

    @registry.define("gated", on_message=gate)
    async def gated(ctx: HandlerContext, wake: WakeEvent) -> None:
        seen.append([m.key for m in wake.messages])
        assert ctx.wake is wake  # the context sees the narrowed wake too

    ctx = await invoke(registry, "gated", wake_of(message("a", "ok"), message("b", "bad")))
    assert seen == [["a"]]
    assert ctx.effects.replies == [{"refused": "b"}]
    assert ctx.effects.own[0]["value"]["in_reply_to"] == "b"
    assert ctx.current_message is None


async def test_a_wake_answered_entirely_by_on_message_skips_the_handler() -> None:
    registry = Registry()
    calls: list[int] = []

    async def answer(ctx: HandlerContext, msg: InboxMessage) -> Any:
        return "pong"

    @registry.define("echo", on_message=answer)
    def echo(ctx: HandlerContext, wake: WakeEvent) -> None:
        calls.append(1)

    ctx = await invoke(registry, "echo", wake_of(message("a", "ping"), message("b", "ping")))
    assert calls == [] and ctx.effects.replies == ["pong", "pong"]


async def test_a_handler_error_propagates_from_invoke() -> None:
    registry = Registry()

    @registry.define("broken")
    async def broken(ctx: HandlerContext, wake: WakeEvent) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await invoke(registry, "broken", wake_of(message("a", 1)))
