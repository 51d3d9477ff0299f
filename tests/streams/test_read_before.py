"""``Store.read_before``, the bounded read backwards from a stream's tail, on every backend:
the messages right before an offset, oldest first, with the offset to go on from; walking back
to the start gives the stream; forks read through their parent; errors as ``read``'s."""

from __future__ import annotations

import pytest

from streams import BadOffset, InvalidRequest, StreamNotFound, format_offset, open_store


async def test_read_before_walks_back_to_the_start(store_url: str) -> None:
    async with open_store(store_url) as store:
        await store.create("s")
        await store.append("s", [f"m{i}".encode() for i in range(25)])
        messages, begin = await store.read_before("s", limit=10)
        assert [m.data for m in messages] == [f"m{i}".encode() for i in range(15, 25)]
        assert [m.offset for m in messages] == [format_offset(i) for i in range(16, 26)]
        assert begin == format_offset(15)
        seen = list(messages)
        while begin != "-1":
            messages, begin = await store.read_before("s", begin, limit=10)
            seen[:0] = messages
        assert [m.data for m in seen] == [f"m{i}".encode() for i in range(25)]
        forward = await store.read("s", limit=100)
        assert seen == forward.messages


async def test_read_before_an_offset_and_at_the_edges(store_url: str) -> None:
    async with open_store(store_url) as store:
        await store.create("s")
        await store.append("s", [b"a", b"b", b"c", b"d"])
        messages, begin = await store.read_before("s", format_offset(3), limit=2)
        assert [m.data for m in messages] == [b"b", b"c"] and begin == format_offset(1)
        messages, begin = await store.read_before("s", format_offset(1), limit=5)
        assert [m.data for m in messages] == [b"a"] and begin == "-1"
        assert await store.read_before("s", "-1") == ([], "-1")
        messages, begin = await store.read_before("s", "now", limit=1000)
        assert [m.data for m in messages] == [b"a", b"b", b"c", b"d"] and begin == "-1"
        await store.create("empty")
        assert await store.read_before("empty") == ([], "-1")
        with pytest.raises(StreamNotFound):
            await store.read_before("missing")
        with pytest.raises(BadOffset):
            await store.read_before("s", "garbage")
        with pytest.raises(InvalidRequest):
            await store.read_before("s", limit=0)


async def test_read_before_on_a_fork_reads_through_its_parent(store_url: str) -> None:
    async with open_store(store_url) as store:
        await store.create("p")
        await store.append("p", [b"p1", b"p2", b"p3"])
        await store.create("f", fork_from="p", fork_offset=format_offset(2))
        await store.append("f", [b"f1", b"f2"])
        messages, begin = await store.read_before("f", limit=3)
        assert [m.data for m in messages] == [b"p2", b"f1", b"f2"] and begin == format_offset(1)
        messages, begin = await store.read_before("f", begin, limit=3)
        assert [m.data for m in messages] == [b"p1"] and begin == "-1"
