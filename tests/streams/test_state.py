"""The State Protocol: event codec, the materialiser fold, and snapshot + tail rebuilds."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from streams import (
    SNAPSHOT_NAMESPACE,
    InvalidRequest,
    Materializer,
    Store,
    StreamNotFound,
    change,
    control,
    decode_event,
    encode_event,
    format_offset,
    materialize,
    save_snapshot,
)

# -- codec -------------------------------------------------------------------------------------


def test_change_builds_events() -> None:
    assert change("users", "u1", {"name": "Ada"}) == {
        "type": "users",
        "key": "u1",
        "value": {"name": "Ada"},
        "headers": {"operation": "insert"},
    }
    updated = change(
        "users",
        "u1",
        {"name": "Ada L."},
        operation="update",
        old_value={"name": "Ada"},
        txid="t1",
        timestamp="2026-01-01T00:00:00Z",
    )
    assert updated["old_value"] == {"name": "Ada"}
    assert updated["headers"] == {
        "operation": "update",
        "txid": "t1",
        "timestamp": "2026-01-01T00:00:00Z",
    }
    deleted = change("users", "u1", operation="delete")
    assert "value" not in deleted and deleted["headers"]["operation"] == "delete"
    assert change("users", "u1", None)["value"] is None  # an insert of null keeps its value


def test_control_messages() -> None:
    assert control("reset") == {"headers": {"control": "reset"}}
    assert control("snapshot-end", format_offset(3)) == {
        "headers": {"control": "snapshot-end", "offset": format_offset(3)}
    }


@pytest.mark.parametrize(
    "event",
    [
        change("t", "k", {"nested": [1, 2, {"x": None}]}),
        change("t", "k", "text", operation="update", old_value="old"),
        change("t", "k", operation="delete"),
        change("t", "k", None),
        control("snapshot-start"),
        control("snapshot-end", "0000000000000000_0000000000000009"),
        control("reset"),
        {"type": "t", "key": "k", "value": 1, "headers": {"operation": "insert", "extra": True}},
    ],
)
def test_codec_round_trip(event: dict[str, Any]) -> None:
    data = encode_event(event)
    assert isinstance(data, bytes)
    assert decode_event(data) == event
    assert decode_event(data.decode()) == event


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b"42",
        b'"a string"',
        b"null",
        b"{}",
        b'{"type": "t", "key": "k", "value": 1}',
        b'{"type": "t", "key": "k", "value": 1, "headers": []}',
        b'{"type": "t", "key": "k", "value": 1, "headers": {}}',
        b'{"type": "t", "key": "k", "value": 1, "headers": {"operation": "upsert"}}',
        b'{"type": "t", "key": "k", "value": 1, "headers": {"operation": null}}',
        b'{"key": "k", "value": 1, "headers": {"operation": "insert"}}',
        b'{"type": "", "key": "k", "value": 1, "headers": {"operation": "insert"}}',
        b'{"type": 7, "key": "k", "value": 1, "headers": {"operation": "insert"}}',
        b'{"type": "t", "value": 1, "headers": {"operation": "insert"}}',
        b'{"type": "t", "key": "", "value": 1, "headers": {"operation": "insert"}}',
        b'{"type": "t", "key": 5, "value": 1, "headers": {"operation": "insert"}}',
        b'{"type": "t", "key": "k", "headers": {"operation": "insert"}}',
        b'{"type": "t", "key": "k", "headers": {"operation": "update"}}',
        b'{"headers": {"control": "rewind"}}',
        b'{"headers": {"control": null}}',
    ],
)
def test_decode_rejects_bad_events(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        decode_event(raw)


# -- the fold ----------------------------------------------------------------------------------


def test_fold_insert_update_delete_reset() -> None:
    view = Materializer()
    view.apply(change("users", "u1", {"n": 1}))
    view.apply(change("users", "u2", {"n": 2}))
    view.apply(change("teams", "t1", "red"))
    view.apply(change("users", "u1", {"n": 10}, operation="update", old_value={"n": 1}))
    assert view.get("users", "u1") == {"n": 10}
    assert view.collection("users") == {"u1": {"n": 10}, "u2": {"n": 2}}
    view.apply(change("users", "u2", operation="delete"))
    view.apply(change("users", "missing", operation="delete"))  # deleting nothing is fine
    view.apply(change("nowhere", "x", operation="delete"))
    assert view.collection("users") == {"u1": {"n": 10}}
    assert view.get("users", "u2") is None
    assert view.collection("nowhere") == {}
    assert view.applied == 7
    view.apply(control("snapshot-start"))
    view.apply(control("snapshot-end"))
    assert view.collection("teams") == {"t1": "red"}
    view.apply(control("reset"))
    assert view.collections == {}
    view.apply(change("users", "u3", {"n": 3}))
    assert view.collections == {"users": {"u3": {"n": 3}}}


def test_update_of_an_absent_key_upserts() -> None:
    view = Materializer()
    view.apply(change("t", "k", 1, operation="update"))
    assert view.get("t", "k") == 1


def test_fold_filters_types() -> None:
    view = Materializer(types=["keep"])
    view.apply(change("keep", "a", 1))
    view.apply(change("drop", "b", 2))
    view.apply(change("drop", "b", operation="delete"))
    assert view.collections == {"keep": {"a": 1}}
    assert view.applied == 1


def test_apply_bytes() -> None:
    view = Materializer()
    view.apply_bytes(encode_event(change("t", "k", [1, 2])))
    assert view.get("t", "k") == [1, 2]


def test_snapshot_round_trip() -> None:
    view = Materializer()
    view.apply(change("t", "k", {"deep": [1, {"x": "y"}]}))
    view.offset = format_offset(1)
    again = Materializer.from_snapshot(view.snapshot())
    assert again.collections == view.collections
    assert again.offset == format_offset(1)
    assert again.applied == 0
    filtered = Materializer.from_snapshot(view.snapshot(), types=["other"])
    filtered.apply(change("t", "k2", 1))
    assert filtered.get("t", "k2") is None


def test_snapshot_with_unknown_version() -> None:
    with pytest.raises(InvalidRequest):
        Materializer.from_snapshot(orjson.dumps({"v": 999, "offset": "-1", "collections": {}}))


# -- materialize over a store ------------------------------------------------------------------


async def append_events(store: Store, path: str, events: list[dict[str, Any]]) -> str:
    result = await store.append(path, [encode_event(e) for e in events])
    return result.next_offset


def events_for(start: int, count: int) -> list[dict[str, Any]]:
    """Upserts of ``row{i % 7}`` with deletes mixed in, numbered from ``start``."""
    out: list[dict[str, Any]] = []
    for i in range(start, start + count):
        if i % 5 == 4:
            out.append(change("rows", f"row{(i - 1) % 7}", operation="delete"))
        else:
            out.append(change("rows", f"row{i % 7}", {"i": i}, operation="update"))
    return out


def fold(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    view = Materializer()
    for event in events:
        view.apply(event)
    return view.collections


async def test_materialize_reads_the_whole_stream(store: Store) -> None:
    await store.create("s", content_type="application/json")
    events = events_for(0, 57)
    tail = await append_events(store, "s", events)
    view = await materialize(store, "s", batch=10)
    assert view.collections == fold(events)
    assert view.offset == tail
    assert view.applied == 57


async def test_materialize_an_empty_stream(store: Store) -> None:
    await store.create("s", content_type="application/json")
    view = await materialize(store, "s")
    assert view.collections == {} and view.offset == "-1" and view.applied == 0


async def test_materialize_missing_stream(store: Store) -> None:
    with pytest.raises(StreamNotFound):
        await materialize(store, "missing")


async def test_materialize_after_snapshot_reads_only_the_tail(store: Store) -> None:
    await store.create("s", content_type="application/json")
    head_events = events_for(0, 200)
    await append_events(store, "s", head_events)
    first = await materialize(store, "s", batch=64)
    assert first.applied == 200
    await save_snapshot(store, "s", first)
    assert await store.kv_get(SNAPSHOT_NAMESPACE, "s") == first.snapshot()

    tail_events = events_for(200, 13)
    tail = await append_events(store, "s", tail_events)
    view = await materialize(store, "s", batch=5)
    assert view.applied == 13  # only the tail was folded
    assert view.offset == tail
    assert view.collections == fold(head_events + tail_events)

    full = await materialize(store, "s", use_snapshot=False)
    assert full.applied == 213
    assert full.collections == view.collections

    # Nothing after the snapshot: nothing is folded at all.
    await save_snapshot(store, "s", view)
    assert (await materialize(store, "s")).applied == 0


async def test_materialize_until(store: Store) -> None:
    await store.create("s", content_type="application/json")
    events = events_for(0, 40)
    offsets: list[str] = []
    for event in events:
        offsets.append(await append_events(store, "s", [event]))
    for k in (1, 7, 25, 40):
        view = await materialize(store, "s", until=offsets[k - 1], batch=6)
        assert view.collections == fold(events[:k])
        assert view.offset == offsets[k - 1]
    # A snapshot taken after ``until`` is ignored; one taken before it is used.
    late = await materialize(store, "s", until=offsets[30])
    await save_snapshot(store, "s", late)
    early = await materialize(store, "s", until=offsets[9])
    assert early.collections == fold(events[:10]) and early.applied == 10
    later = await materialize(store, "s", until=offsets[35])
    assert later.collections == fold(events[:36]) and later.applied == 5


async def test_materialize_with_reset_in_the_stream(store: Store) -> None:
    await store.create("s", content_type="application/json")
    await append_events(store, "s", [change("t", "a", 1), change("t", "b", 2)])
    await append_events(store, "s", [control("reset"), change("t", "c", 3)])
    view = await materialize(store, "s")
    assert view.collections == {"t": {"c": 3}}


async def test_snapshots_are_per_stream(store: Store) -> None:
    await store.create("a", content_type="application/json")
    await store.create("b", content_type="application/json")
    await append_events(store, "a", [change("t", "k", "a")])
    await append_events(store, "b", [change("t", "k", "b")])
    await save_snapshot(store, "a", await materialize(store, "a"))
    assert (await materialize(store, "b")).get("t", "k") == "b"
    assert (await materialize(store, "a")).get("t", "k") == "a"


def test_a_materializer_keeps_named_collections_and_prefixes() -> None:
    view = Materializer(types={"tags"}, prefixes=("state:",))
    for type_ in ("tags", "state:rows", "inbox", "statefull"):
        view.apply(change(type_, "k", {"t": type_}))
    assert sorted(view.collections) == ["state:rows", "tags"]
    assert view.applied == 2
    again = Materializer.from_snapshot(view.snapshot(), types={"tags"}, prefixes=("state:",))
    again.apply(change("state:other", "k", 1))
    again.apply(change("texts", "k", 1))
    assert sorted(again.collections) == ["state:other", "state:rows", "tags"]
