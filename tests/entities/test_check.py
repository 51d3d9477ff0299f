"""``check_deploy``: the data a deployment stored, checked against new code. Breaking changes
(a required field without a default, a changed inbox schema, a removed type with live entities,
a handler that behaves differently) are findings naming what they concern; compatible ones (a
field with a default, a new type, a migration) pass.

The old code writes through one runtime; the check runs the new code over the same store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from entities import CheckReport, HandlerContext, Registry, Runtime, WakeEvent, check_deploy
from entities import collection as collection_of
from streams import Store, open_store


class Total(BaseModel):
    key: str
    value: int = 0


class Add(BaseModel):
    add: int


def counter_registry(
    model: type[BaseModel] = Total,
    *,
    inbox: type[BaseModel] = Add,
    factor: int = 1,
    extra_type: bool = False,
    version: int = 1,
) -> Registry:
    """A counter whose code varies the way deploys do."""
    registry = Registry()
    migrate = {1: lambda row: {**row, "unit": "apples"}} if version == 2 else None

    @registry.define(
        "counter",
        state={"totals": collection_of(model, version=version, migrate=migrate)},
        inbox=inbox,
    )
    async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
        totals = ctx.state.totals
        for m in wake.messages:
            row = totals.get("total")
            value = (row.value if row else 0) + m.payload.get("add", 0) * factor
            fresh = {"key": "total", **({"unit": "apples"} if "unit" in model.model_fields else {})}
            data = {**(row.model_dump() if row else fresh), "value": value}
            totals.upsert(data)
            ctx.reply(value)

    if extra_type:

        @registry.define("greeter")
        async def greeter(ctx: HandlerContext, wake: WakeEvent) -> None:
            return None

    return registry


def other_registry() -> Registry:
    registry = counter_registry()

    @registry.define("logger")
    async def logger(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            ctx.reply("logged")

    return registry


@pytest.fixture
async def store(shared_store_url: str) -> AsyncIterator[Store]:
    async with open_store(shared_store_url) as opened:
        yield opened


async def _counters(store: Store, n: int = 2) -> Runtime:
    old = Runtime(other_registry(), store)
    for i in range(n):
        await old.spawn(f"/counter/c{i}")
        await old.send(f"/counter/c{i}", {"add": 2})
        await old.run_until_idle()  # one wake each
        await old.send(f"/counter/c{i}", {"add": 3})
        await old.run_until_idle()
    return old


async def _check(store: Store, registry: Registry, replay_last: int = 20) -> CheckReport:
    return await check_deploy(Runtime(registry, store), replay_last=replay_last)


async def test_unchanged_code_passes_and_replays_the_last_wakes(store: Store) -> None:
    await _counters(store, n=3)
    report = await _check(store, other_registry())
    assert report.ok, report.findings
    assert (report.entities, report.rows, report.messages) == (3, 3, 0)
    assert report.wakes == 6
    assert report.summary().startswith("ok: 3 live entities, 3 state rows, 0 queued messages")
    assert (await _check(store, other_registry(), replay_last=4)).wakes == 4


async def test_a_required_field_without_a_default_is_named(store: Store) -> None:
    await _counters(store)

    class Strict(Total):
        unit: str  # new, required, no default

    report = await _check(store, counter_registry(Strict, extra_type=True), replay_last=0)
    rows = [f for f in report.findings if f.kind == "invalid_row"]
    assert [(f.urls, f.collection, f.key, f.field) for f in rows] == [
        (("/counter/c0",), "totals", "total", "unit"),
        (("/counter/c1",), "totals", "total", "unit"),
    ]
    assert rows[0].message == (
        "/counter/c0 state 'totals' row 'total': field 'unit' does not fit Strict: Field required"
    )
    assert not report.ok


async def test_compatible_changes_pass(store: Store) -> None:
    await _counters(store)

    class WithDefault(Total):
        unit: str = "apples"

    class WithUnit(Total):
        unit: str  # required, but a migration fills it in for old rows

    # a field with a default, a new type (the removed "logger" has no entities)
    assert (await _check(store, counter_registry(WithDefault, extra_type=True))).ok
    migrated = await _check(store, counter_registry(WithUnit, version=2))
    assert migrated.ok, migrated.findings
    assert migrated.wakes == 4  # replayed writes compared after upgrading the recorded rows


async def test_a_removed_type_with_live_entities_is_named(store: Store) -> None:
    old = Runtime(other_registry(), store)
    for i in range(7):
        await old.spawn(f"/logger/l{i}")
    await old.spawn("/logger/stopped")
    await old.run_until_idle()
    await old.kill("/logger/stopped")
    report = await _check(store, counter_registry())
    [finding] = report.findings
    assert finding.kind == "missing_type" and finding.type == "logger"
    assert finding.message == (
        "type 'logger' is not in the new code but has 7 live entities: /logger/l0, /logger/l1, "
        "/logger/l2, /logger/l3, /logger/l4 and 2 more"
    )
    assert len(finding.urls) == 7 and "/logger/stopped" not in finding.urls


async def test_a_queued_message_invalid_under_the_new_inbox_schema_is_named(
    store: Store,
) -> None:
    old = await _counters(store, n=1)
    receipt = await old.send("/counter/c0", {"add": 5})  # queued: no worker took it yet

    class Amount(BaseModel):
        amount: int

    report = await _check(store, counter_registry(inbox=Amount), replay_last=0)
    [finding] = report.findings
    assert finding.kind == "invalid_message"
    assert (finding.urls, finding.collection, finding.key, finding.field) == (
        ("/counter/c0",), "inbox", receipt.key, "amount",
    )  # fmt: skip
    assert finding.message == (
        f"/counter/c0 queued inbox message {receipt.key!r}: field 'amount' does not fit the new "
        "inbox schema: Field required"
    )
    assert report.messages == 1  # the acknowledged messages are history, not checked


async def test_a_handler_that_behaves_differently_diverges_on_replay(store: Store) -> None:
    await _counters(store, n=1)
    report = await _check(store, counter_registry(factor=2))
    divergences = [f for f in report.findings if f.kind == "divergence"]
    assert divergences and all(f.urls == ("/counter/c0",) for f in divergences)
    assert divergences[0].wake_id is not None
    assert "diverges when replayed" in divergences[0].message
    assert "state:totals/total" in divergences[0].message
    assert report.to_json()["ok"] is False


async def test_state_is_read_from_the_snapshot_and_tail(store: Store) -> None:
    old = Runtime(other_registry(), store, snapshot_every=3)
    await old.spawn("/counter/long")
    for n in range(10):
        await old.send("/counter/long", {"add": n})
        await old.run_until_idle()
    starts: list[str] = []
    read = store.read

    async def counting(path: str, offset: str = "-1", **kw: Any) -> Any:
        if path == "counter/long/main":
            starts.append(offset)
        return await read(path, offset, **kw)

    store.read = counting  # type: ignore[method-assign]
    try:
        report = await _check(store, other_registry(), replay_last=0)
    finally:
        del store.read
    assert report.ok and report.rows == 1
    assert starts and "-1" not in starts  # never from the stream's start
