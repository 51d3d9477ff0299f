"""The store contract: one suite, run against every backend through the ``store`` fixture."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from streams import (
    Append,
    AppendResult,
    BadOffset,
    ConditionFailed,
    ContentTypeMismatch,
    Create,
    CreateResult,
    Delete,
    ForkSourceNotFound,
    InvalidRequest,
    KvCheck,
    KvPut,
    Producer,
    ProducerEpochInvalid,
    ProducerFenced,
    ProducerSequenceGap,
    ProducerState,
    SequenceConflict,
    Store,
    StreamClosed,
    StreamExists,
    StreamGone,
    StreamNotFound,
    StreamsError,
    Touch,
    format_offset,
    open_store,
)


async def read_all(store: Store, path: str, offset: str = "-1", limit: int = 1000) -> list[bytes]:
    """Every message after ``offset``, following ``next_offset`` until up to date."""
    out: list[bytes] = []
    while True:
        result = await store.read(path, offset, limit=limit)
        out.extend(m.data for m in result.messages)
        offset = result.next_offset
        if result.up_to_date:
            return out
        assert result.messages, "a read that is not up to date must make progress"


def off(n: int) -> str:
    return format_offset(n)


# -- create ------------------------------------------------------------------------------------


async def test_create_new_stream(store: Store) -> None:
    result = await store.create("a/b", content_type="application/json")
    assert result.created
    info = result.info
    assert info.path == "a/b"
    assert info.content_type == "application/json"
    assert not info.closed
    assert info.next_offset == off(0)
    assert info.ttl_seconds is None and info.expires_at is None
    assert info.forked_from is None and info.fork_offset is None
    head = await store.head("a/b")
    assert head.next_offset == off(0)
    assert head.content_type == "application/json"


async def test_create_default_content_type(store: Store) -> None:
    info = (await store.create("s")).info
    assert info.content_type == "application/octet-stream"


async def test_create_is_idempotent_with_same_config(store: Store) -> None:
    first = await store.create("s", content_type="application/json", ttl_seconds=3600)
    await store.append("s", [b"1"])
    again = await store.create(
        "s", content_type="application/json; charset=utf-8", ttl_seconds=3600
    )
    assert first.created and not again.created
    assert again.info.next_offset == off(1)
    assert await read_all(store, "s") == [b"1"]


async def test_create_same_config_ignores_initial_messages(store: Store) -> None:
    await store.create("s", messages=[b"x"])
    again = await store.create("s", messages=[b"y", b"z"])
    assert not again.created
    assert await read_all(store, "s") == [b"x"]


@pytest.mark.parametrize(
    "changes",
    [
        {"content_type": "text/plain"},
        {"ttl_seconds": 60},
        {"expires_at": time.time() + 3600},
        {"closed": True},
    ],
    ids=["content_type", "ttl", "expires_at", "closed"],
)
async def test_create_with_different_config_raises_stream_exists(
    store: Store, changes: dict[str, Any]
) -> None:
    await store.create("s", content_type="application/json")
    await store.append("s", [b"1"])
    kwargs: dict[str, Any] = {"content_type": "application/json", **changes}
    with pytest.raises(StreamExists) as err:
        await store.create("s", **kwargs)
    assert err.value.path == "s"
    info = await store.head("s")
    assert info.content_type == "application/json" and not info.closed
    assert info.ttl_seconds is None and info.expires_at is None
    assert info.next_offset == off(1)


async def test_create_closed(store: Store) -> None:
    result = await store.create("s", closed=True)
    assert result.info.closed
    assert (await store.head("s")).closed
    with pytest.raises(StreamClosed) as err:
        await store.append("s", [b"x"])
    assert err.value.path == "s"
    assert err.value.next_offset == off(0)
    read = await store.read("s")
    assert read.messages == [] and read.up_to_date and read.closed
    assert not (await store.create("s", closed=True)).created


async def test_create_with_initial_messages(store: Store) -> None:
    result = await store.create("s", messages=[b"one", b"two"])
    assert result.info.next_offset == off(2)
    read = await store.read("s")
    assert [(m.offset, m.data) for m in read.messages] == [(off(1), b"one"), (off(2), b"two")]


async def test_create_closed_with_initial_messages(store: Store) -> None:
    result = await store.create("s", messages=[b"only"], closed=True)
    assert result.info.closed and result.info.next_offset == off(1)
    read = await store.read("s")
    assert [m.data for m in read.messages] == [b"only"] and read.closed


@pytest.mark.parametrize(
    "kwargs",
    [{"ttl_seconds": 60, "expires_at": time.time() + 60}, {"ttl_seconds": -1}],
    ids=["ttl_and_expires_at", "negative_ttl"],
)
async def test_create_rejects_bad_expiry(store: Store, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as err:
        await store.create("s", **kwargs)
    assert err.value.path == "s"
    with pytest.raises(StreamNotFound):
        await store.head("s")


async def test_create_keeps_ttl_and_expiry_in_info(store: Store) -> None:
    expires = time.time() + 3600
    assert (await store.create("t", ttl_seconds=90)).info.ttl_seconds == 90
    assert (await store.create("e", expires_at=expires)).info.expires_at == pytest.approx(expires)
    assert (await store.head("t")).ttl_seconds == 90
    assert (await store.head("e")).expires_at == pytest.approx(expires)


# -- append ------------------------------------------------------------------------------------


async def test_append_single(store: Store) -> None:
    await store.create("s")
    result = await store.append("s", [b"hello"])
    assert result == AppendResult(off(1), False)
    read = await store.read("s")
    assert [(m.offset, m.data) for m in read.messages] == [(off(1), b"hello")]
    assert read.next_offset == off(1) and read.up_to_date and not read.closed


async def test_append_many_is_one_atomic_batch(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"a"])
    result = await store.append("s", [b"b", b"", b"\x00\xff binary"])
    assert result.next_offset == off(4)
    read = await store.read("s")
    assert [m.data for m in read.messages] == [b"a", b"b", b"", b"\x00\xff binary"]
    assert [m.offset for m in read.messages] == [off(1), off(2), off(3), off(4)]
    assert (await store.head("s")).next_offset == off(4)


async def test_append_nothing_is_invalid(store: Store) -> None:
    await store.create("s")
    with pytest.raises(InvalidRequest) as err:
        await store.append("s", [])
    assert err.value.path == "s"


async def test_append_to_missing_stream(store: Store) -> None:
    with pytest.raises(StreamNotFound) as err:
        await store.append("nope", [b"x"])
    assert err.value.path == "nope"


async def test_append_content_type_mismatch(store: Store) -> None:
    await store.create("s", content_type="application/json")
    with pytest.raises(ContentTypeMismatch) as err:
        await store.append("s", [b"1"], content_type="text/plain")
    assert err.value.path == "s"
    assert (await store.head("s")).next_offset == off(0)
    # Parameters and case do not count; no content type means "the stream's".
    await store.append("s", [b"1"], content_type="Application/JSON; charset=utf-8")
    await store.append("s", [b"2"])
    assert await read_all(store, "s") == [b"1", b"2"]


async def test_stream_seq_must_increase(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"1"], stream_seq="001")
    await store.append("s", [b"2"], stream_seq="002")
    for stale in ("002", "001", "0019"):
        with pytest.raises(SequenceConflict) as err:
            await store.append("s", [b"x"], stream_seq=stale)
        assert err.value.path == "s"
    await store.append("s", [b"3"], stream_seq="010")
    await store.append("s", [b"4"])  # no seq: no check
    assert await read_all(store, "s") == [b"1", b"2", b"3", b"4"]


async def test_append_error_precedence(store: Store) -> None:
    await store.create("s", content_type="application/json")
    await store.append("s", [b"1"], stream_seq="5")
    with pytest.raises(ContentTypeMismatch):
        await store.append("s", [b"2"], content_type="text/plain", stream_seq="1")
    await store.close_stream("s")
    with pytest.raises(StreamClosed):
        await store.append("s", [b"2"], content_type="text/plain", stream_seq="1")


# -- close -------------------------------------------------------------------------------------


async def test_close_is_idempotent_and_blocks_appends(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"a", b"b"])
    closed = await store.close_stream("s")
    assert closed.closed and closed.next_offset == off(2)
    again = await store.close_stream("s")
    assert again.closed and again.next_offset == off(2)
    assert (await store.head("s")).closed
    with pytest.raises(StreamClosed) as err:
        await store.append("s", [b"c"])
    assert err.value.path == "s"
    assert err.value.next_offset == off(2)
    assert await read_all(store, "s") == [b"a", b"b"]


async def test_append_and_close_atomically(store: Store) -> None:
    await store.create("s")
    result = await store.append("s", [b"last"], close=True)
    assert result.closed and result.next_offset == off(1)
    read = await store.read("s")
    assert [m.data for m in read.messages] == [b"last"]
    assert read.up_to_date and read.closed


async def test_closed_flag_only_at_the_tail(store: Store) -> None:
    await store.create("s", messages=[b"1", b"2", b"3"], closed=True)
    partial = await store.read("s", limit=2)
    assert not partial.up_to_date and not partial.closed
    rest = await store.read("s", partial.next_offset)
    assert [m.data for m in rest.messages] == [b"3"]
    assert rest.up_to_date and rest.closed


async def test_close_missing_stream(store: Store) -> None:
    with pytest.raises(StreamNotFound) as err:
        await store.close_stream("nope")
    assert err.value.path == "nope"


# -- delete ------------------------------------------------------------------------------------


async def test_delete(store: Store) -> None:
    await store.create("s", messages=[b"1", b"2"])
    await store.delete("s")
    for call in (store.head("s"), store.read("s"), store.append("s", [b"x"]), store.delete("s")):
        with pytest.raises(StreamNotFound) as err:
            await call
        assert err.value.path == "s"
    recreated = await store.create("s", content_type="text/plain")
    assert recreated.created and recreated.info.next_offset == off(0)
    assert await read_all(store, "s") == []


async def test_delete_missing_stream(store: Store) -> None:
    with pytest.raises(StreamNotFound) as err:
        await store.delete("nope")
    assert err.value.path == "nope"


async def test_soft_delete_keeps_the_source_for_forks(store: Store) -> None:
    await store.create("src", messages=[b"1", b"2", b"3"])
    await store.create("fork", fork_from="src", fork_offset=off(2))
    await store.append("fork", [b"f"])
    await store.delete("src")
    for call in (
        store.head("src"),
        store.read("src"),
        store.append("src", [b"x"]),
        store.close_stream("src"),
        store.delete("src"),
        store.create("src"),
        store.wait("src", off(0), 0.01),
    ):
        with pytest.raises(StreamGone) as err:
            await call
        assert err.value.path == "src"
    with pytest.raises(StreamGone):
        await store.create("other", fork_from="src")
    assert await read_all(store, "fork") == [b"1", b"2", b"f"]
    # Deleting the last fork purges the source: the path is free again.
    await store.delete("fork")
    with pytest.raises(StreamNotFound):
        await store.head("src")
    with pytest.raises(StreamNotFound):
        await store.head("fork")
    again = await store.create("src")
    assert again.created and again.info.next_offset == off(0)
    assert await read_all(store, "src") == []


async def test_soft_delete_chain_purges_once_all_forks_go(store: Store) -> None:
    await store.create("a", messages=[b"a1", b"a2"])
    await store.create("b", fork_from="a")
    await store.append("b", [b"b3"])
    await store.create("c", fork_from="b", fork_offset=off(1))
    await store.create("d", fork_from="a", fork_offset=off(1))
    await store.append("c", [b"c2"])
    await store.delete("a")
    await store.delete("b")
    assert await read_all(store, "c") == [b"a1", b"c2"]
    assert await read_all(store, "d") == [b"a1"]
    await store.delete("c")  # b is purged; a still has d
    with pytest.raises(StreamNotFound):
        await store.head("b")
    with pytest.raises(StreamGone):
        await store.head("a")
    assert await read_all(store, "d") == [b"a1"]
    await store.delete("d")
    with pytest.raises(StreamNotFound):
        await store.head("a")
    assert (await store.create("a")).created
    assert (await store.create("b")).created
    assert await read_all(store, "a") == [] and await read_all(store, "b") == []


# -- forks -------------------------------------------------------------------------------------


async def test_fork_reads_through_the_fork_boundary(store: Store) -> None:
    await store.create("src", content_type="text/plain", messages=[b"1", b"2", b"3"])
    result = await store.create(
        "fork", content_type="text/plain", fork_from="src", fork_offset=off(2)
    )
    assert result.created
    assert result.info.next_offset == off(2)
    assert result.info.forked_from == "src" and result.info.fork_offset == off(2)
    head = await store.head("fork")
    assert head.forked_from == "src" and head.fork_offset == off(2)
    await store.append("fork", [b"f3", b"f4"])
    await store.append("src", [b"4"])
    read = await store.read("fork")
    assert [(m.offset, m.data) for m in read.messages] == [
        (off(1), b"1"),
        (off(2), b"2"),
        (off(3), b"f3"),
        (off(4), b"f4"),
    ]
    for start in range(5):
        assert await read_all(store, "fork", off(start)) == [b"1", b"2", b"f3", b"f4"][start:]
        assert (
            await read_all(store, "fork", off(start), limit=1) == [b"1", b"2", b"f3", b"f4"][start:]
        )
    assert await read_all(store, "src") == [b"1", b"2", b"3", b"4"]


async def test_fork_defaults_to_the_source_tail(store: Store) -> None:
    await store.create("src", messages=[b"1", b"2"])
    info = (await store.create("fork", fork_from="src")).info
    assert info.next_offset == off(2) and info.fork_offset == off(2)
    assert await read_all(store, "fork") == [b"1", b"2"]
    same = await store.create("fork", fork_from="src")
    assert not same.created


async def test_fork_of_fork(store: Store) -> None:
    await store.create("a", messages=[b"1", b"2"])
    await store.create("b", fork_from="a", fork_offset=off(1), messages=[b"b2", b"b3"])
    await store.create("c", fork_from="b", fork_offset=off(2), messages=[b"c3"])
    assert await read_all(store, "b") == [b"1", b"b2", b"b3"]
    assert await read_all(store, "c") == [b"1", b"b2", b"c3"]
    assert await read_all(store, "c", off(1), limit=1) == [b"b2", b"c3"]


async def test_fork_offset_beyond_tail(store: Store) -> None:
    await store.create("src", messages=[b"1"])
    with pytest.raises(BadOffset):
        await store.create("fork", fork_from="src", fork_offset=off(2))
    with pytest.raises(BadOffset):
        await store.create("fork", fork_from="src", fork_offset="garbage")
    with pytest.raises(StreamNotFound):
        await store.head("fork")
    await store.delete("src")  # no fork was counted: a hard delete
    with pytest.raises(StreamNotFound):
        await store.head("src")


async def test_fork_from_missing_source(store: Store) -> None:
    with pytest.raises(ForkSourceNotFound) as err:
        await store.create("fork", fork_from="missing")
    assert err.value.path == "missing"
    with pytest.raises(StreamNotFound):
        await store.head("fork")


async def test_fork_does_not_inherit_producers(store: Store) -> None:
    await store.create("src")
    await store.append("src", [b"1"], producer=Producer("p", 0, 0))
    await store.create("fork", fork_from="src")
    result = await store.append("fork", [b"2"], producer=Producer("p", 0, 0))
    assert not result.duplicate
    assert await read_all(store, "fork") == [b"1", b"2"]


# -- idempotent producers ----------------------------------------------------------------------


async def test_producer_duplicate_is_a_noop_with_the_original_result(store: Store) -> None:
    await store.create("s")
    first = await store.append("s", [b"a"], producer=Producer("p", 0, 0))
    assert first == AppendResult(off(1), False, producer=ProducerState(0, 0))
    second = await store.append("s", [b"b", b"c"], producer=Producer("p", 0, 1))
    assert second.next_offset == off(3) and not second.duplicate
    again = await store.append("s", [b"b", b"c"], producer=Producer("p", 0, 1))
    assert again.duplicate
    assert again.next_offset == second.next_offset
    assert again.producer == ProducerState(0, 1)
    older = await store.append("s", [b"a"], producer=Producer("p", 0, 0))
    assert older.duplicate
    assert await read_all(store, "s") == [b"a", b"b", b"c"]


async def test_producer_stale_epoch_is_fenced(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"a"], producer=Producer("p", 0, 0))
    bumped = await store.append("s", [b"b"], producer=Producer("p", 1, 0))
    assert bumped.producer == ProducerState(1, 0)
    with pytest.raises(ProducerFenced) as err:
        await store.append("s", [b"zombie"], producer=Producer("p", 0, 1))
    assert err.value.current_epoch == 1
    assert err.value.path == "s"
    assert await read_all(store, "s") == [b"a", b"b"]


async def test_producer_sequence_gap(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"a"], producer=Producer("p", 0, 0))
    with pytest.raises(ProducerSequenceGap) as err:
        await store.append("s", [b"x"], producer=Producer("p", 0, 5))
    assert (err.value.expected, err.value.received) == (1, 5)
    assert err.value.path == "s"
    with pytest.raises(ProducerSequenceGap) as first:
        await store.append("s", [b"x"], producer=Producer("fresh", 0, 3))
    assert (first.value.expected, first.value.received) == (0, 3)
    await store.append("s", [b"b"], producer=Producer("p", 0, 1))
    assert await read_all(store, "s") == [b"a", b"b"]


async def test_producer_new_epoch_must_start_at_zero(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"a"], producer=Producer("p", 0, 0))
    with pytest.raises(ProducerEpochInvalid) as err:
        await store.append("s", [b"x"], producer=Producer("p", 1, 3))
    assert err.value.path == "s"
    await store.append("s", [b"b"], producer=Producer("p", 1, 0))
    assert await read_all(store, "s") == [b"a", b"b"]


async def test_producers_are_independent(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"p0"], producer=Producer("p", 0, 0))
    await store.append("s", [b"q0"], producer=Producer("q", 3, 0))
    await store.append("s", [b"p1"], producer=Producer("p", 0, 1))
    assert (await store.append("s", [b"q0"], producer=Producer("q", 3, 0))).duplicate
    assert await read_all(store, "s") == [b"p0", b"q0", b"p1"]


async def test_producer_close_is_idempotent_for_the_closer_only(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"a"], producer=Producer("p", 0, 0))
    closed = await store.append("s", [b"b"], producer=Producer("p", 0, 1), close=True)
    assert closed.closed and not closed.duplicate and closed.next_offset == off(2)
    again = await store.append("s", [b"b"], producer=Producer("p", 0, 1), close=True)
    assert again.duplicate and again.closed and again.next_offset == off(2)
    with pytest.raises(StreamClosed) as err:
        await store.append("s", [b"c"], producer=Producer("p", 0, 2))
    assert err.value.next_offset == off(2)
    with pytest.raises(StreamClosed):
        await store.close_stream("s", producer=Producer("q", 0, 0))
    assert await read_all(store, "s") == [b"a", b"b"]


async def test_recreated_stream_forgets_producers_and_stream_seq(store: Store) -> None:
    await store.create("s")
    await store.append("s", [b"old"], producer=Producer("p", 3, 0), stream_seq="9")
    await store.delete("s")
    await store.create("s")
    fresh = await store.append("s", [b"new"], producer=Producer("p", 0, 0), stream_seq="1")
    assert not fresh.duplicate and fresh.next_offset == off(1)
    assert await read_all(store, "s") == [b"new"]


@pytest.mark.parametrize(
    "producer", [Producer("", 0, 0), Producer("p", -1, 0), Producer("p", 0, -1)]
)
async def test_producer_fields_are_validated(store: Store, producer: Producer) -> None:
    await store.create("s")
    with pytest.raises(InvalidRequest):
        await store.append("s", [b"x"], producer=producer)
    assert await read_all(store, "s") == []


# -- reads -------------------------------------------------------------------------------------


async def test_read_with_limit(store: Store) -> None:
    payloads = [f"m{i}".encode() for i in range(10)]
    await store.create("s", messages=payloads)
    first = await store.read("s", limit=3)
    assert [m.data for m in first.messages] == payloads[:3]
    assert first.next_offset == off(3) and not first.up_to_date
    second = await store.read("s", first.next_offset, limit=100)
    assert [m.data for m in second.messages] == payloads[3:]
    assert second.next_offset == off(10) and second.up_to_date


async def test_read_with_max_bytes(store: Store) -> None:
    payloads = [bytes([65 + i]) * 10 for i in range(6)]
    await store.create("s", messages=payloads)
    one = await store.read("s", max_bytes=1)
    assert [m.data for m in one.messages] == payloads[:1]  # at least one, even if too big
    offset = "-1"
    seen: list[bytes] = []
    while True:
        result = await store.read("s", offset, max_bytes=25)
        got = [m.data for m in result.messages]
        assert got, "every read makes progress"
        assert sum(len(d) for d in got[:-1]) < 25
        seen.extend(got)
        offset = result.next_offset
        if result.up_to_date:
            break
    assert seen == payloads


async def test_read_sentinels(store: Store) -> None:
    await store.create("s", messages=[b"1", b"2"])
    start = await store.read("s", "-1")
    assert [m.data for m in start.messages] == [b"1", b"2"]
    assert (await store.read("s")).messages == start.messages
    tail = await store.read("s", "now")
    assert tail.messages == [] and tail.up_to_date and tail.next_offset == off(2)
    await store.append("s", [b"3"])
    resumed = await store.read("s", tail.next_offset)
    assert [m.data for m in resumed.messages] == [b"3"]


async def test_read_now_on_empty_stream(store: Store) -> None:
    await store.create("s")
    tail = await store.read("s", "now")
    assert tail.messages == [] and tail.up_to_date and tail.next_offset == off(0)


async def test_read_from_every_returned_offset_is_the_exact_suffix(store: Store) -> None:
    payloads = [bytes(range(i % 256)) * (1 + i % 3) for i in range(40)]
    await store.create("s")
    offsets = ["-1"]
    for start in range(0, 40, 7):
        result = await store.append("s", payloads[start : start + 7])
        offsets.append(result.next_offset)
    read = await store.read("s")
    offsets.extend(m.offset for m in read.messages)
    assert [m.offset for m in read.messages] == sorted({m.offset for m in read.messages})
    for offset in offsets:
        position = 0 if offset == "-1" else int(offset.split("_")[1])
        assert await read_all(store, "s", offset, limit=9) == payloads[position:]


@pytest.mark.parametrize(
    "offset",
    [
        "",
        "abc",
        "-2",
        "1",
        "0000000000000000_1",
        "0000000000000001_0000000000000000",
        "0000000000000000_000000000000000a",
        "0000000000000000,0000000000000001",
        " 0000000000000000_0000000000000001",
    ],
)
async def test_bad_offsets(store: Store, offset: str) -> None:
    await store.create("s", messages=[b"1"])
    with pytest.raises(BadOffset) as err:
        await store.read("s", offset)
    assert err.value.path == "s"
    with pytest.raises(BadOffset):
        await store.wait("s", offset, 0.01)


async def test_read_missing_stream(store: Store) -> None:
    with pytest.raises(StreamNotFound) as err:
        await store.read("nope")
    assert err.value.path == "nope"
    with pytest.raises(StreamNotFound):
        await store.head("nope")


# -- TTL and expiry ----------------------------------------------------------------------------


async def test_expires_at_in_the_past(store: Store) -> None:
    await store.create("s", expires_at=time.time() - 1, messages=[b"1"])
    for call in (store.head("s"), store.read("s"), store.append("s", [b"x"]), store.delete("s")):
        with pytest.raises(StreamNotFound) as err:
            await call
        assert err.value.path == "s"
    fresh = await store.create("s")
    assert fresh.created and fresh.info.next_offset == off(0)
    assert await read_all(store, "s") == []


async def test_expired_stream_cannot_be_forked(store: Store) -> None:
    await store.create("s", expires_at=time.time() - 1, messages=[b"1"])
    with pytest.raises(ForkSourceNotFound):
        await store.create("fork", fork_from="s")


async def test_expiry_at_a_future_time(store: Store) -> None:
    await store.create("s", expires_at=time.time() + 0.5)
    await store.append("s", [b"1"])
    assert (await store.head("s")).next_offset == off(1)
    await asyncio.sleep(0.7)
    with pytest.raises(StreamNotFound):
        await store.head("s")


async def test_sliding_ttl_renewed_by_reads_not_by_head(store: Store) -> None:
    await store.create("read", ttl_seconds=1)
    await store.create("head", ttl_seconds=1)
    await asyncio.sleep(0.6)
    await store.read("read")
    await store.head("head")
    await asyncio.sleep(0.6)
    assert (await store.head("read")).ttl_seconds == 1  # 1.2 s old, 0.6 s since the read
    with pytest.raises(StreamNotFound):
        await store.head("head")
    await store.append("read", [b"x"])  # appends renew too
    await asyncio.sleep(0.6)
    assert await read_all(store, "read") == [b"x"]
    await asyncio.sleep(1.1)
    with pytest.raises(StreamNotFound):
        await store.read("read")


async def test_touch_renews_ttl(store: Store) -> None:
    await store.create("s", ttl_seconds=1)
    await asyncio.sleep(0.6)
    assert await store.commit([Touch("s")]) == [None]
    await asyncio.sleep(0.6)
    await store.head("s")
    with pytest.raises(StreamNotFound):
        await store.commit([Touch("missing")])


async def test_expired_stream_kept_for_forks(store: Store) -> None:
    await store.create("src", expires_at=time.time() + 0.3, messages=[b"1", b"2"])
    await store.create("fork", fork_from="src", fork_offset=off(1))
    await asyncio.sleep(0.4)
    with pytest.raises(StreamNotFound):
        await store.head("src")
    # Expired counts as deleted: while the fork needs it, the path is not free (as after delete).
    with pytest.raises(StreamGone) as err:
        await store.create("src")
    assert err.value.path == "src"
    assert await read_all(store, "fork") == [b"1"]
    await store.delete("fork")
    fresh = await store.create("src")
    assert fresh.created and fresh.info.next_offset == off(0)
    assert await read_all(store, "src") == []


# -- multi-op commits --------------------------------------------------------------------------


async def test_commit_applies_ops_in_order(store: Store) -> None:
    results = await store.commit(
        [
            Create("a"),
            Append("a", [b"1", b"2"]),
            Create("b", fork_from="a"),
            Append("b", [b"3"]),
            KvPut("ns", "k", b"v"),
            Touch("a"),
        ]
    )
    assert isinstance(results[0], CreateResult) and results[0].created
    assert results[1] == AppendResult(off(2), False)
    assert isinstance(results[2], CreateResult) and results[2].info.next_offset == off(2)
    assert results[3] == AppendResult(off(3), False)
    assert results[4:] == [True, None]
    assert await read_all(store, "b") == [b"1", b"2", b"3"]
    assert await store.kv_get("ns", "k") == b"v"


@pytest.mark.parametrize(
    ("failing", "error"),
    [
        (Append("missing", [b"x"]), StreamNotFound),
        (Append("s", [b"x"], content_type="text/plain"), ContentTypeMismatch),
        (Append("s", [b"x"], stream_seq="0"), SequenceConflict),
        (Append("s", [b"x"], producer=Producer("p", 0, 9)), ProducerSequenceGap),
        (Create("s", content_type="text/plain"), StreamExists),
        (Create("f2", fork_from="missing"), ForkSourceNotFound),
        (Delete("missing"), StreamNotFound),
        (Append("s", []), InvalidRequest),
        (KvCheck("ns", "k", b"other"), ConditionFailed),
        (Create("s", content_type="application/json", exclusive=True), StreamExists),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, type) else v.__name__,
)
async def test_a_failing_op_makes_the_whole_commit_change_nothing(
    store: Store, failing: Any, error: type[Exception]
) -> None:
    await store.create("s", content_type="application/json")
    await store.append("s", [b"1"], stream_seq="5", producer=Producer("p", 0, 0))
    await store.create("victim", messages=[b"v"])
    await store.create("closer")
    await store.kv_put("ns", "k", b"old")
    with pytest.raises(error):
        await store.commit(
            [
                Create("new", messages=[b"n"]),
                Append("s", [b"2"], producer=Producer("p", 0, 1)),
                Append("closer", [b"3"], close=True),
                KvPut("ns", "k", b"new"),
                KvPut("ns", "k2", b"new"),
                Delete("victim"),
                failing,
            ]
        )
    with pytest.raises(StreamNotFound):
        await store.head("new")
    info = await store.head("s")
    assert info.next_offset == off(1) and not info.closed
    assert await read_all(store, "victim") == [b"v"]
    closer = await store.head("closer")
    assert not closer.closed and closer.next_offset == off(0)
    assert await store.kv_get("ns", "k") == b"old"
    assert await store.kv_get("ns", "k2") is None
    # Producer state did not move either: seq 1 is still the next one.
    result = await store.append("s", [b"2"], producer=Producer("p", 0, 1))
    assert not result.duplicate and result.next_offset == off(2)


async def test_concurrent_commits_fail_independently(store: Store) -> None:
    await store.create("s")

    async def one(i: int) -> str:
        path = "s" if i % 4 else "missing"
        try:
            await store.commit([Append(path, [f"{i}".encode()]), KvPut("ns", str(i), b"x")])
        except StreamNotFound:
            return "failed"
        return "ok"

    outcomes = await asyncio.gather(*(one(i) for i in range(60)))
    assert outcomes.count("failed") == 15
    data = await read_all(store, "s")
    assert sorted(int(d) for d in data) == [i for i in range(60) if i % 4]
    keys = [k for k, _ in await store.kv_scan("ns")]
    assert sorted(int(k) for k in keys) == [i for i in range(60) if i % 4]


# -- key-value side table ----------------------------------------------------------------------


async def test_kv_put_get_scan_delete(store: Store) -> None:
    assert await store.kv_get("ns", "a") is None
    assert await store.kv_scan("ns") == []
    await store.kv_put("ns", "a/1", b"one")
    await store.kv_put("ns", "a/2", b"two")
    await store.kv_put("ns", "b", b"bee")
    await store.kv_put("ns", "a%", b"pct")
    await store.kv_put("other", "a/1", b"elsewhere")
    assert await store.kv_get("ns", "a/1") == b"one"
    await store.kv_put("ns", "a/1", b"uno")
    assert await store.kv_get("ns", "a/1") == b"uno"
    assert await store.kv_scan("ns", "a/") == [("a/1", b"uno"), ("a/2", b"two")]
    assert await store.kv_scan("ns", "a%") == [("a%", b"pct")]
    assert [k for k, _ in await store.kv_scan("ns")] == ["a%", "a/1", "a/2", "b"]
    assert await store.kv_scan("other") == [("a/1", b"elsewhere")]
    await store.kv_put("ns", "a/1", None)
    assert await store.kv_get("ns", "a/1") is None
    assert await store.kv_scan("ns", "a/") == [("a/2", b"two")]
    await store.kv_put("ns", "never-set", None)  # removing a missing key is fine
    assert await store.kv_get("other", "a/1") == b"elsewhere"


async def test_kv_scan_pages_with_start_end_and_limit(store: Store) -> None:
    for key in ["a/1", "a/2", "a/3", "a/4", "b/1"]:
        await store.kv_put("ns", key, key.encode())

    async def keys(*args: str, **kwargs: str | int | None) -> list[str]:
        return [k for k, _ in await store.kv_scan("ns", *args, **kwargs)]  # type: ignore[arg-type]

    assert await keys(after="a/2") == ["a/3", "a/4", "b/1"]
    assert await keys("a/", after="a/3") == ["a/4"]  # both bounds hold
    assert await keys("a/", after="0") == ["a/1", "a/2", "a/3", "a/4"]  # after is below the prefix
    assert await keys("a/", after="a/4") == []
    assert await keys(after="a/1", limit=2) == ["a/2", "a/3"]  # page on from the last key seen
    assert await keys(after="a/1", end="a/4") == ["a/2", "a/3"]
    # a full round from a cursor: after it to the end, then from the beginning through it
    tail = await keys(after="a/3")
    head = await keys(end="a/3\x01")
    assert head + tail == ["a/1", "a/2", "a/3", "a/4", "b/1"]


async def test_kv_values_are_byte_exact(store: Store) -> None:
    blob = bytes(range(256)) * 40
    await store.kv_put("ns", "blob", blob)
    await store.kv_put("ns", "empty", b"")
    assert await store.kv_get("ns", "blob") == blob
    assert await store.kv_get("ns", "empty") == b""


async def test_kv_compare_and_set(store: Store) -> None:
    assert await store.commit([KvPut("ns", "lease", b"w1", only_if=True, expect=None)]) == [True]
    lost = await store.commit([KvPut("ns", "lease", b"w2", only_if=True, expect=None)])
    assert lost == [False]
    assert await store.kv_get("ns", "lease") == b"w1"
    moved = await store.commit([KvPut("ns", "lease", b"w2", only_if=True, expect=b"w1")])
    assert moved == [True]
    await store.create("s")
    with pytest.raises(ConditionFailed):
        await store.commit([KvCheck("ns", "lease", b"w1"), Append("s", [b"stale"])])
    await store.commit([KvCheck("ns", "lease", b"w2"), Append("s", [b"fresh"])])
    await store.commit([KvCheck("ns", "absent", None)])
    # A check sees the commit's own earlier writes.
    await store.commit([KvPut("ns", "x", b"1"), KvCheck("ns", "x", b"1")])
    assert await read_all(store, "s") == [b"fresh"]


async def test_exclusive_create(store: Store) -> None:
    created = (await store.commit([Create("s", exclusive=True)]))[0]
    assert isinstance(created, CreateResult) and created.created
    with pytest.raises(StreamExists) as err:
        await store.commit([Create("s", exclusive=True)])
    assert err.value.path == "s"


# -- wait (live tail) --------------------------------------------------------------------------


async def test_wait_wakes_on_append(store: Store) -> None:
    await store.create("s", messages=[b"1"])
    waiter = asyncio.create_task(store.wait("s", off(1), 10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    started = time.monotonic()
    await store.append("s", [b"2"])
    assert await waiter is True
    assert time.monotonic() - started < 2
    assert [m.data for m in (await store.read("s", off(1))).messages] == [b"2"]


async def test_wait_wakes_on_close(store: Store) -> None:
    await store.create("s")
    waiter = asyncio.create_task(store.wait("s", off(0), 10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await store.close_stream("s")
    assert await asyncio.wait_for(waiter, 2) is True


async def test_wait_times_out(store: Store) -> None:
    await store.create("s", messages=[b"1"])
    started = time.monotonic()
    assert await store.wait("s", off(1), 0.15) is False
    assert await store.wait("s", "now", 0.05) is False
    assert time.monotonic() - started >= 0.19


async def test_wait_returns_at_once_when_data_or_close_is_there(store: Store) -> None:
    await store.create("s", messages=[b"1"])
    assert await asyncio.wait_for(store.wait("s", "-1", 10), 2) is True
    assert await asyncio.wait_for(store.wait("s", off(0), 10), 2) is True
    await store.close_stream("s")
    assert await asyncio.wait_for(store.wait("s", off(1), 10), 2) is True


async def test_wait_now_wakes_on_next_append(store: Store) -> None:
    await store.create("s", messages=[b"1"])
    waiter = asyncio.create_task(store.wait("s", "now", 10))
    await asyncio.sleep(0.05)
    await store.append("s", [b"2"])
    assert await asyncio.wait_for(waiter, 2) is True


async def test_wait_is_per_stream(store: Store) -> None:
    await store.create("s")
    await store.create("other")
    waiter = asyncio.create_task(store.wait("s", off(0), 0.3))
    await asyncio.sleep(0.05)
    await store.append("other", [b"x"])
    assert await waiter is False


async def test_wait_on_fork_wakes_for_fork_appends(store: Store) -> None:
    await store.create("src", messages=[b"1"])
    await store.create("fork", fork_from="src")
    waiter = asyncio.create_task(store.wait("fork", off(1), 10))
    await asyncio.sleep(0.05)
    await store.append("fork", [b"f"])
    assert await asyncio.wait_for(waiter, 2) is True


async def test_wait_on_missing_stream(store: Store) -> None:
    with pytest.raises(StreamNotFound) as err:
        await store.wait("nope", "-1", 0.01)
    assert err.value.path == "nope"


async def test_many_waiters_all_wake(store: Store) -> None:
    await store.create("s")
    waiters = [asyncio.create_task(store.wait("s", off(0), 10)) for _ in range(50)]
    await asyncio.sleep(0.05)
    await store.append("s", [b"x"])
    assert await asyncio.wait_for(asyncio.gather(*waiters), 3) == [True] * 50


# -- concurrency -------------------------------------------------------------------------------


async def test_concurrent_create_append_delete_churn(store: Store) -> None:
    """Many tasks create, append to and delete a few paths at once (one group commit in SQLite
    often mixes a delete and a re-create of the same path); every answer stays consistent."""
    paths = [f"churn/{i}" for i in range(3)]

    async def worker(task: int) -> None:
        for round_ in range(15):
            path = paths[(task + round_) % len(paths)]
            try:
                await store.create(path, messages=[b"c"])
                result = await store.append(path, [f"{task}".encode(), f"{task}".encode()])
                # Whichever incarnation of the path took it: "c" plus whole pairs.
                assert int(result.next_offset.split("_")[1]) % 2 == 1
                if round_ % 3 == 2:
                    await store.delete(path)
            except StreamNotFound:
                pass  # another task deleted it in between: fine

    await asyncio.gather(*(worker(t) for t in range(12)))
    for path in paths:
        try:
            data = await read_all(store, path)
        except StreamNotFound:
            continue
        assert data[0] == b"c" and len(data) % 2 == 1
        for first, second in zip(data[1::2], data[2::2], strict=True):
            assert first == second


async def test_commits_racing_close_never_hang(store_url: str) -> None:
    store = open_store(store_url)
    async with store:
        await store.create("s")
        # These start only once the close is under way.
        tasks = [asyncio.create_task(store.append("s", [b"x"])) for _ in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    for result in results:
        assert isinstance(result, AppendResult | StreamsError), result
    try:
        await asyncio.wait_for(store.append("s", [b"late"]), 10)
    except StreamsError:
        pass


async def test_a_quiet_side_table_write_signals_no_listener(store: Store) -> None:
    """``KvPut(quiet=True)`` is written like any other, but the namespace's listeners are not
    signalled for it (on every backend); a loud write in the same commit still signals."""
    heard: list[str] = []
    store.listen("kv:marks", lambda: heard.append("marks"))
    await store.commit([KvPut("marks", "a", b"1")])
    assert heard == ["marks"]
    heard.clear()
    await store.commit([KvPut("marks", "a", None, only_if=True, expect=b"1", quiet=True)])
    assert heard == [] and await store.kv_get("marks", "a") is None
    await store.commit([KvPut("marks", "b", b"2", quiet=True), KvPut("marks", "c", b"3")])
    assert heard == ["marks"] and await store.kv_get("marks", "b") == b"2"


async def test_text_no_database_can_store_fails_its_own_commit_only(
    store: Store, backend: str
) -> None:
    """A path or key that is not valid UTF-8 (a lone surrogate, which Python strings can hold)
    fails the commit that carries it, with InvalidRequest, and no commit made alongside it."""
    if backend == "memory":
        pytest.skip("memory stores Python strings as they are")
    results = await asyncio.gather(
        store.kv_put("ns", "ok-1", b"1"),
        store.kv_put("ns", "bad\udcff", b"2"),
        store.create("bad\udcff/path"),
        store.append("ok\udcff", [b"x"]),
        store.kv_put("ns", "ok-2", b"3"),
        return_exceptions=True,
    )
    assert [type(r).__name__ for r in results[1:4]] == ["InvalidRequest"] * 3
    assert [await store.kv_get("ns", k) for k in ("ok-1", "ok-2")] == [b"1", b"3"]
