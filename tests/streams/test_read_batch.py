"""The PostgreSQL backend's read coalescing (``ReadBatcher``), on its own: concurrent reads of one
kind share a query, every read is answered by a query that started after it was made, a failed
query fails only its own reads, and a closed batcher fails the reads still waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from streams._backends._postgres_batch import ReadBatcher


class Source:
    """A fake query: records each batch it gets; answers ``key * 10 + version``."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.version = 0
        self.gate: asyncio.Event | None = None
        self.fail_next = False

    async def run(self, keys: Sequence[int]) -> list[int]:
        self.batches.append(list(keys))
        seen = self.version  # the "snapshot" this query reads, taken as it starts
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("query failed")
        return [k * 10 + seen for k in keys]


async def test_concurrent_reads_share_a_query_and_each_gets_its_own_answer() -> None:
    source = Source()
    batcher = ReadBatcher(source.run, parallel=1)
    got = await asyncio.gather(*(batcher.get(k) for k in range(50)))
    assert got == [k * 10 for k in range(50)]
    assert len(source.batches) < 5  # one query for the first, one for the rest (not 50)
    assert sorted(k for batch in source.batches for k in batch) == list(range(50))


async def test_batches_are_bounded() -> None:
    source = Source()
    batcher = ReadBatcher(source.run, max_batch=8, parallel=1)
    got = await asyncio.gather(*(batcher.get(k) for k in range(30)))
    assert got == [k * 10 for k in range(30)]
    assert max(len(batch) for batch in source.batches) <= 8


async def test_a_read_made_during_a_query_is_answered_by_a_later_one() -> None:
    source = Source()
    source.gate = asyncio.Event()
    batcher = ReadBatcher(source.run, parallel=1)
    first = asyncio.ensure_future(batcher.get(1))
    await asyncio.sleep(0.01)
    assert source.batches == [[1]]  # in flight, reading version 0
    source.version = 1  # a commit lands; then a read is made
    second = asyncio.ensure_future(batcher.get(2))
    await asyncio.sleep(0.01)
    source.gate.set()
    assert await first == 10
    assert await second == 21  # not served by the query that started before it (version 0)
    assert source.batches == [[1], [2]]


async def test_a_failed_query_fails_only_its_own_reads() -> None:
    source = Source()
    source.gate = asyncio.Event()
    source.fail_next = True
    batcher = ReadBatcher(source.run, parallel=1)
    doomed = asyncio.ensure_future(batcher.get(1))
    await asyncio.sleep(0.01)
    later = asyncio.ensure_future(batcher.get(2))
    await asyncio.sleep(0.01)
    source.gate.set()
    with pytest.raises(RuntimeError, match="query failed"):
        await doomed
    assert await later == 20
    assert await batcher.get(3) == 30  # and the batcher still works


async def test_a_cancelled_reader_does_not_disturb_the_others() -> None:
    source = Source()
    source.gate = asyncio.Event()
    batcher = ReadBatcher(source.run, parallel=1)
    first = asyncio.ensure_future(batcher.get(1))
    await asyncio.sleep(0.01)
    gone, kept = asyncio.ensure_future(batcher.get(2)), asyncio.ensure_future(batcher.get(3))
    await asyncio.sleep(0.01)
    gone.cancel()
    source.gate.set()
    assert await first == 10
    assert await kept == 30
    assert gone.cancelled()
    assert source.batches == [[1], [3]]  # the cancelled read was not even asked for


async def test_closing_fails_the_reads_still_waiting() -> None:
    source = Source()
    source.gate = asyncio.Event()
    batcher = ReadBatcher(source.run, parallel=1)
    running = asyncio.ensure_future(batcher.get(1))
    await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(batcher.get(2))
    await asyncio.sleep(0.01)
    await batcher.aclose()
    for future in (running, queued):
        with pytest.raises(ConnectionError):
            await future


async def test_parallel_queries_start_without_waiting_for_each_other() -> None:
    source = Source()
    source.gate = asyncio.Event()
    batcher = ReadBatcher(source.run, parallel=2)
    first = asyncio.ensure_future(batcher.get(1))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(batcher.get(2))
    await asyncio.sleep(0.01)
    assert source.batches == [[1], [2]]  # two in flight at once
    third = asyncio.ensure_future(batcher.get(3))
    await asyncio.sleep(0.01)
    assert len(source.batches) == 2  # the third waits for one of them to finish
    source.gate.set()
    assert [await first, await second, await third] == [10, 20, 30]


async def test_a_sequential_reader_is_answered_every_time() -> None:
    """A caller woken by its answer reads again at once, before the finished drain task has
    been cleaned up; that read must start a query of its own (it once waited forever)."""
    source = Source()
    batcher = ReadBatcher(source.run, parallel=1)

    async def reader() -> list[int]:
        return [await batcher.get(k) for k in range(20)]

    assert await asyncio.wait_for(reader(), 2) == [k * 10 for k in range(20)]
    assert source.batches == [[k] for k in range(20)]


async def test_reads_after_two_queries_finish_together_are_answered() -> None:
    source = Source()
    source.gate = asyncio.Event()
    batcher = ReadBatcher(source.run, max_batch=1, parallel=2)

    async def reader(first: int, then: int) -> list[int]:
        return [await batcher.get(first), await batcher.get(then)]

    readers = [asyncio.ensure_future(reader(1, 3)), asyncio.ensure_future(reader(2, 4))]
    await asyncio.sleep(0.01)
    assert source.batches == [[1], [2]]  # both slots in flight
    source.gate.set()  # both queries finish in the same turn of the loop
    source.gate = None
    assert await asyncio.wait_for(asyncio.gather(*readers), 2) == [[10, 30], [20, 40]]
