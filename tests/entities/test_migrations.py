"""State migrations: a collection's ``version`` and ``migrate`` chain, applied as a wake reads
its rows (old rows upgraded, new writes recorded at the current version), through
``Runtime.state_of``, and a migration that raises failing the wake clearly until it is fixed.

Old and new code run as two runtimes over one store, as a deploy would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from entities import (
    DefinitionError,
    HandlerContext,
    MigrationFailed,
    Registry,
    Runtime,
    WakeEvent,
    collection,
)
from streams import Store, open_store


class NoteV1(BaseModel):
    key: str
    text: str


class NoteV2(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the version key never reaches the model
    key: str
    title: str
    body: str


def old_registry() -> Registry:
    registry = Registry()

    @registry.define("notes", state={"notes": collection(NoteV1)})
    async def notes(ctx: HandlerContext, wake: WakeEvent) -> None:
        for m in wake.messages:
            ctx.state.notes.upsert(NoteV1(key=m.payload["key"], text=m.payload["text"]))
            ctx.reply(len(ctx.state.notes))

    return registry


def to_v2(row: dict[str, Any]) -> dict[str, Any]:
    return {"key": row["key"], "title": row["text"].split()[0], "body": row["text"]}


def new_registry(migrate: Callable[[dict[str, Any]], dict[str, Any]] = to_v2) -> Registry:
    registry = Registry()

    @registry.define(
        "notes", state={"notes": collection(NoteV2, version=2, migrate={1: migrate})},
        max_attempts=1,
    )  # fmt: skip
    async def notes(ctx: HandlerContext, wake: WakeEvent) -> None:
        for m in wake.messages:
            text = m.payload["text"]
            ctx.state.notes.upsert(NoteV2(key=m.payload["key"], title=text.split()[0], body=text))
            ctx.reply([n.title for n in ctx.state.notes.to_list()])

    return registry


@pytest.fixture
async def store(shared_store_url: str) -> AsyncIterator[Store]:
    async with open_store(shared_store_url) as opened:
        yield opened


async def _old_data(store: Store) -> None:
    old = Runtime(old_registry(), store)
    await old.spawn("/notes/n1")
    await old.send("/notes/n1", {"key": "a", "text": "alpha one"})
    await old.send("/notes/n1", {"key": "b", "text": "beta two"})
    await old.run_until_idle()


async def _state_events(rt: Runtime, url: str) -> list[dict[str, Any]]:
    events, _ = await rt.read(url, limit=1000)
    return [e for e in events if e["type"] == "state:notes"]


async def test_a_wake_sees_old_rows_upgraded_and_writes_the_current_version(store: Store) -> None:
    await _old_data(store)
    new = Runtime(new_registry(), store)
    receipt = await new.send("/notes/n1", {"key": "c", "text": "gamma three"})
    await new.run_until_idle()
    assert await new.replies("/notes/n1", receipt.key) == [["alpha", "beta", "gamma"]]
    written = await _state_events(new, "/notes/n1")
    assert [e["value"] for e in written] == [
        {"key": "a", "text": "alpha one"},  # old rows stay as written in the stream
        {"key": "b", "text": "beta two"},
        {"key": "c", "title": "gamma", "body": "gamma three", "_v": 2},  # with its version
    ]
    assert written[-1]["headers"]["operation"] == "insert"  # still a State Protocol event
    state = await new.state_of("/notes/n1")
    assert state["notes"] == {
        "a": {"key": "a", "title": "alpha", "body": "alpha one"},
        "b": {"key": "b", "title": "beta", "body": "beta two"},
        "c": {"key": "c", "title": "gamma", "body": "gamma three"},
    }
    stored = await new.state_of("/notes/n1", migrate=False)
    assert stored["notes"]["a"] == {"key": "a", "text": "alpha one"}
    inspected = await new.inspect("/notes/n1")
    assert inspected["state"]["notes"]["a"] == {"key": "a", "text": "alpha one"}


async def test_an_update_of_an_old_row_stores_it_at_the_current_version(store: Store) -> None:
    await _old_data(store)
    new = Runtime(new_registry(), store)
    await new.send("/notes/n1", {"key": "a", "text": "alpha again"})
    await new.run_until_idle()
    last = (await _state_events(new, "/notes/n1"))[-1]
    assert last["headers"]["operation"] == "update"
    assert last["value"] == {"key": "a", "title": "alpha", "body": "alpha again", "_v": 2}
    assert last["old_value"] == {"key": "a", "title": "alpha", "body": "alpha one", "_v": 2}


async def test_a_migration_that_raises_fails_the_wake_until_it_is_fixed(store: Store) -> None:
    await _old_data(store)

    def broken(row: dict[str, Any]) -> dict[str, Any]:
        return {"key": row["key"], "title": row["missing"], "body": row["text"]}

    bad = Runtime(new_registry(broken), store)
    receipt = await bad.send("/notes/n1", {"key": "c", "text": "gamma three"})
    await bad.run_until_idle()
    outcome = await bad.outcome("/notes/n1", receipt.key)
    assert outcome.status == "dead_lettered" and outcome.replies == []
    [dead] = await bad.dead_letters()
    assert dead.error_type == "MigrationFailed"
    assert (
        "migrating row 'a' of collection 'notes' of /notes/n1 from version 1 to 2 failed: "
        "KeyError: 'missing'" in dead.error
    )
    with pytest.raises(MigrationFailed, match="collection 'notes'"):
        await bad.state_of("/notes/n1")
    assert (await bad.inspect("/notes/n1"))["state"]["notes"]["a"]["text"] == "alpha one"
    # nothing was written: the fixed code takes the same message again and succeeds
    assert [e["key"] for e in await _state_events(bad, "/notes/n1")] == ["a", "b"]
    fixed = Runtime(new_registry(), store)
    await fixed.retry_dead_letter(dead.id)
    await fixed.run_until_idle()
    events, _ = await fixed.read("/notes/n1", limit=1000)
    replies = [e["value"]["value"] for e in events if e["type"] == "texts"]
    assert replies[-1] == ["alpha", "beta", "gamma"]


class NoteV3(NoteV2):
    tags: list[str] = []


def v3_registry() -> Registry:
    registry = Registry()
    chain = {1: to_v2, 2: lambda row: {**row, "tags": []}}

    @registry.define("notes", state={"notes": collection(NoteV3, version=3, migrate=chain)})
    async def notes(ctx: HandlerContext, wake: WakeEvent) -> None:
        for m in wake.messages:
            text = m.payload["text"]
            ctx.state.notes.upsert(NoteV3(key=m.payload["key"], title=text, body=text, tags=["x"]))

    return registry


async def test_two_steps_chain_and_a_rollback_past_a_version_fails_clearly(store: Store) -> None:
    await _old_data(store)
    v3 = Runtime(v3_registry(), store)
    await v3.send("/notes/n1", {"key": "c", "text": "gamma"})
    await v3.run_until_idle()
    state = await v3.state_of("/notes/n1")
    assert state["notes"]["a"] == {"key": "a", "title": "alpha", "body": "alpha one", "tags": []}
    assert state["notes"]["c"]["tags"] == ["x"]
    v2 = Runtime(new_registry(), store)  # rolled back: a version-3 row is not its to read
    receipt = await v2.send("/notes/n1", {"key": "d", "text": "delta"})
    await v2.run_until_idle()
    assert (await v2.outcome("/notes/n1", receipt.key)).status == "dead_lettered"
    [dead] = await v2.dead_letters()
    assert (
        "row 'c' of collection 'notes' of /notes/n1 is at version 3, newer than the "
        "code's version 2" in dead.error
    )


def test_define_time_checks() -> None:
    def step(row: dict[str, Any]) -> dict[str, Any]:
        return row

    assert collection(NoteV2, version=3, migrate={1: step, 2: step}).version == 3
    with pytest.raises(DefinitionError, match=r"lacks from-versions \[2\]"):
        collection(NoteV2, version=3, migrate={1: step})
    with pytest.raises(DefinitionError, match=r"lacks from-versions \[1\]"):
        collection(NoteV2, version=2)
    with pytest.raises(DefinitionError, match=r"outside 1\.\.1"):
        collection(NoteV2, version=2, migrate={1: step, 3: step})
    with pytest.raises(DefinitionError, match="outside"):
        collection(NoteV2, migrate={1: step})  # version 1 has nothing to migrate from
    with pytest.raises(DefinitionError, match="at least 1"):
        collection(NoteV2, version=0)
    with pytest.raises(DefinitionError, match="not callable"):
        collection(NoteV2, version=2, migrate={1: "nope"})  # type: ignore[dict-item]
