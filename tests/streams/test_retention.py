"""Retention primitives on every backend: removing single messages (holes) and truncating a
prefix. Surviving messages keep their offsets and bytes; a read before the retained start raises
``OffsetGone`` (``410`` over HTTP); ``-1`` starts at the earliest retained message."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from streams import (
    Append,
    BadOffset,
    InvalidRequest,
    KvPut,
    Message,
    OffsetGone,
    Remove,
    Store,
    StreamForked,
    Truncate,
    format_offset,
    open_store,
)
from tests import _postgres
from tests.streams._live_server import LiveServer, backend_db, running_server


def off(n: int) -> str:
    return format_offset(n)


async def read_all(store: Store, path: str, offset: str = "-1", limit: int = 1000) -> list[Message]:
    out: list[Message] = []
    while True:
        result = await store.read(path, offset, limit=limit)
        out.extend(result.messages)
        offset = result.next_offset
        if result.up_to_date:
            return out
        assert result.messages, "a read that is not up to date must make progress"


async def ten(store: Store, path: str = "s") -> None:
    await store.create(path)
    await store.append(path, [f"m{i}".encode() for i in range(1, 11)])


async def test_remove_leaves_holes_and_offsets(store: Store) -> None:
    await ten(store)
    before = await read_all(store, "s")
    await store.remove("s", [off(2), off(3), off(7)])
    after = await read_all(store, "s")
    assert [m.data for m in after] == [b"m1", b"m4", b"m5", b"m6", b"m8", b"m9", b"m10"]
    kept = {m.offset: m.data for m in before}
    assert all(kept[m.offset] == m.data for m in after)  # same offsets, same bytes
    # a read from inside the holes starts at the next survivor
    result = await store.read("s", off(1), limit=1)
    assert [m.data for m in result.messages] == [b"m4"] and result.next_offset == off(4)
    info = await store.head("s")
    assert info.next_offset == off(10) and info.retained_from is None
    await store.remove("s", [off(2)])  # idempotent
    with pytest.raises(BadOffset):
        await store.remove("s", [off(11)])
    with pytest.raises(InvalidRequest):
        await store.remove("s", ["-1"])


async def test_holes_at_the_tail_reach_up_to_date(store: Store) -> None:
    await ten(store)
    await store.remove("s", [off(n) for n in range(6, 11)])
    result = await store.read("s", off(5))
    assert result.messages == [] and result.up_to_date and result.next_offset == off(10)
    # small pages across a long run of holes still progress and end up to date
    await store.remove("s", [off(n) for n in range(2, 5)])
    assert [m.data for m in await read_all(store, "s", limit=1)] == [b"m1", b"m5"]
    await store.append("s", [b"m11"])
    result = await store.read("s", off(5))
    assert [m.data for m in result.messages] == [b"m11"] and result.next_offset == off(11)


async def test_truncate_prefix(store: Store) -> None:
    await ten(store)
    await store.truncate("s", off(4))
    info = await store.head("s")
    assert info.retained_from == off(4) and info.next_offset == off(10)
    assert [m.offset for m in await read_all(store, "s")] == [off(n) for n in range(5, 11)]
    assert (await store.read("s", off(4))).messages[0].data == b"m5"
    with pytest.raises(OffsetGone) as gone:
        await store.read("s", off(3))
    assert gone.value.earliest == off(4)
    with pytest.raises(OffsetGone):
        await store.read("s", off(0))
    await store.truncate("s", off(2))  # before the start: nothing happens
    assert (await store.head("s")).retained_from == off(4)
    await store.truncate("s", "now")  # everything
    result = await store.read("s", "-1")
    assert result.messages == [] and result.up_to_date and result.next_offset == off(10)
    await store.append("s", [b"m11"])
    assert [m.data for m in await read_all(store, "s")] == [b"m11"]
    with pytest.raises(BadOffset):
        await store.truncate("s", off(99))


async def test_ops_are_atomic_with_kv_writes(store: Store) -> None:
    await ten(store)
    await store.commit(
        [Remove("s", [off(9)]), Truncate("s", off(2)), KvPut("meta", "s", b"compacted")]
    )
    assert [m.data for m in await read_all(store, "s")][:2] == [b"m3", b"m4"]
    assert b"m9" not in [m.data for m in await read_all(store, "s")]
    assert await store.kv_get("meta", "s") == b"compacted"
    # a failing op later in the commit undoes the removal
    with pytest.raises(BadOffset):
        await store.commit([Remove("s", [off(5)]), Truncate("s", off(50))])
    assert b"m5" in [m.data for m in await read_all(store, "s")]
    # removing what this very commit appends
    await store.commit([Append("s", [b"x", b"y"]), Remove("s", [off(11)])])
    assert [m.data for m in await read_all(store, "s")][-1] == b"y"


async def test_forks_and_retention(store: Store) -> None:
    await ten(store)
    await store.truncate("s", off(3))
    with pytest.raises(OffsetGone):
        await store.create("early", fork_from="s", fork_offset=off(2))
    await store.create("f", fork_from="s", fork_offset=off(6))
    # the fork starts where its source is retained and shares its messages
    assert (await store.head("f")).retained_from == off(3)
    assert [m.data for m in await read_all(store, "f")] == [b"m4", b"m5", b"m6"]
    # data a fork reads cannot go while the fork lives
    with pytest.raises(StreamForked):
        await store.remove("s", [off(5)])
    with pytest.raises(StreamForked):
        await store.truncate("s", off(5))
    # a fork's own history: holes in its own messages, truncation anywhere
    await store.append("f", [b"f7", b"f8", b"f9"])
    with pytest.raises(InvalidRequest):
        await store.remove("f", [off(5)])  # inherited from the source
    await store.remove("f", [off(8)])
    assert [m.data for m in await read_all(store, "f")] == [b"m4", b"m5", b"m6", b"f7", b"f9"]
    await store.truncate("f", off(5))
    assert [m.data for m in await read_all(store, "f")] == [b"m6", b"f7", b"f9"]
    with pytest.raises(OffsetGone):
        await store.read("f", off(4))
    # the source's messages stayed (the fork only moved its own start)
    assert [m.data for m in await read_all(store, "s")][:3] == [b"m4", b"m5", b"m6"]
    await store.truncate("f", off(8))  # past the fork point: its own messages go
    assert [m.data for m in await read_all(store, "f")] == [b"f9"]
    await store.delete("f")
    await store.truncate("s", off(5))  # no fork left
    assert (await read_all(store, "s"))[0].data == b"m6"


async def test_retention_survives_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    async with open_store(url) as store:
        await ten(store)
        await store.truncate("s", off(3))
        await store.remove("s", [off(5)])
    async with open_store(url) as store:
        assert (await store.head("s")).retained_from == off(3)
        assert [m.data for m in await read_all(store, "s")][:2] == [b"m4", b"m6"]
        with pytest.raises(OffsetGone):
            await store.read("s", off(1))


# -- over HTTP -----------------------------------------------------------------------------


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=_postgres.marks())]
)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, LiveServer]]:
    """A live server and the URL of its store, which the test opens too (SQLite and PostgreSQL
    stores may be shared by several stores and processes)."""
    directory = tmp_path_factory.mktemp("retention")
    with backend_db(request.param, directory) as db, running_server(db) as server:
        yield db, server


async def test_http_410_before_retention(shared: tuple[str, LiveServer]) -> None:
    db, server = shared
    name = f"r{uuid.uuid4().hex[:10]}"
    async with open_store(db) as store, httpx2.AsyncClient(timeout=10) as http:
        url = server.stream(name)
        created = await http.put(url, headers={"Content-Type": "application/json"})
        assert created.status_code == 201
        for i in range(1, 7):
            await http.post(url, json={"n": i}, headers={"Content-Type": "application/json"})
        path = server.path(name).removeprefix("/v1/stream/")
        await store.truncate(path, off(2))
        await store.remove(path, [off(4)])

        gone = await http.get(url, params={"offset": off(1)})
        assert gone.status_code == 410
        assert gone.headers["Stream-Earliest-Offset"] == off(2)
        first = await http.get(url, params={"offset": "-1"})
        assert first.status_code == 200
        assert [item["n"] for item in first.json()] == [3, 5, 6]
        assert first.headers["Stream-Next-Offset"] == off(6)
        live: Any = await http.get(url, params={"offset": off(1), "live": "long-poll"})
        assert live.status_code == 410
        sse = await http.get(url, params={"offset": off(0), "live": "sse"})
        assert sse.status_code == 410
        # from the retained start on, nothing changed
        again = await http.get(url, params={"offset": off(2)})
        assert again.status_code == 200 and [item["n"] for item in again.json()] == [3, 5, 6]
