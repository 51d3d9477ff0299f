"""What a store hands ``Store._committed`` after each commit (:class:`streams.Committed`):
the messages it appended are exactly what a read returns at those offsets, stream ids tell a
path's streams apart, and the rewritten paths are named. ``entities serve`` hands this to its
worker, whose claims then fold the messages instead of reading them."""

from __future__ import annotations

import asyncio

import pytest

import streams
from streams import (
    Append,
    Committed,
    ConditionFailed,
    Create,
    Delete,
    KvCheck,
    KvPut,
    Remove,
    Truncate,
    format_offset,
)


def _capture(store: streams.Store) -> list[Committed]:
    seen: list[Committed] = []
    original = store._committed

    def captured(committed: Committed) -> None:
        seen.append(committed)
        original(committed)

    store._committed = captured  # type: ignore[method-assign]
    return seen


async def test_appended_messages_read_back_at_their_positions(store: streams.Store) -> None:
    seen = _capture(store)
    await store.commit([Create("a/x", messages=[b"m1", b"m2"])])
    await store.commit([Create("a/y")])
    # one group of several calls, one of which fails: its append is not among what was written
    await asyncio.gather(
        store.commit([Append("a/x", [b"m3"]), Append("a/y", [b"y1", b"y2"])]),
        store.commit([Append("a/x", [b"m4"])]),
        store.commit([KvCheck("ns", "k", b"absent"), Append("a/x", [b"never"])]),
        return_exceptions=True,
    )
    appended = [a for committed in seen for a in committed.appended]
    for path in ("a/x", "a/y"):
        mine = [(position, data) for p, _sid, position, data in appended if p == path]
        read = await store.read(path)
        assert [(m.offset, m.data) for m in read.messages] == [
            (format_offset(position), data) for position, data in mine
        ]
    assert b"never" not in {data for *_rest, data in appended}
    ids = {sid for p, sid, _pos, _data in appended if p == "a/x"}
    assert len(ids) == 1 and ids != {sid for p, sid, _pos, _data in appended if p == "a/y"}
    assert [c.rewritten for c in seen[:2]] == [frozenset({"a/x"}), frozenset({"a/y"})]
    assert all(not c.rewritten for c in seen[2:])
    # the calls handed over are those that succeeded
    assert all(not any(isinstance(op, KvCheck) for ops in c.calls for op in ops) for c in seen)


async def test_a_path_created_again_is_another_stream(store: streams.Store) -> None:
    seen = _capture(store)
    await store.commit([Create("b/x", messages=[b"old"])])
    await store.commit([Delete("b/x")])
    await store.commit([Create("b/x", messages=[b"new"])])
    first, deleted, second = seen
    assert deleted.rewritten == frozenset({"b/x"}) and not deleted.appended
    (_p1, old_id, old_position, _d1) = first.appended[0]
    (_p2, new_id, new_position, data) = second.appended[0]
    assert old_position == new_position == 1 and data == b"new"
    assert old_id != new_id  # the same path and position, another stream


async def test_removals_and_cuts_name_their_path(store: streams.Store) -> None:
    seen = _capture(store)
    await store.commit([Create("c/x", messages=[b"1", b"2", b"3"])])
    await store.commit([Truncate("c/x", format_offset(1))])
    await store.commit([Remove("c/x", [format_offset(2)])])
    await store.commit([KvPut("ns", "k", b"v")])
    assert [c.rewritten for c in seen[1:]] == [
        frozenset({"c/x"}),
        frozenset({"c/x"}),
        frozenset(),
    ]
    with pytest.raises(ConditionFailed):
        await store.commit([KvCheck("ns", "k", b"other"), Append("c/x", [b"4"])])
    # a commit that changed nothing hands nothing over (at most an empty group)
    assert all(not c.calls and not c.appended and not c.touched for c in seen[4:])
