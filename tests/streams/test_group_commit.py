"""The group-commit queue: a lone call is handed to the writer at once; a busy writer (its
last group held several calls) lingers before its next group, so calls that arrive meanwhile
join it."""

from __future__ import annotations

import asyncio

from streams import KvPut
from streams._backends._group import CommitQueue, Pending


async def _writer(queue: CommitQueue, groups: list[list[Pending]]) -> None:
    async for group in queue.groups():
        groups.append(group)
        for pending in group:
            pending.future.set_result([])


async def _one(queue: CommitQueue, writer: asyncio.Task[None], key: str) -> None:
    await queue.submit([KvPut("ns", key, b"v")], writer)


async def _sizes(linger: float) -> list[int]:
    queue = CommitQueue(linger=linger)
    groups: list[list[Pending]] = []
    writer = asyncio.create_task(_writer(queue, groups))
    try:
        await _one(queue, writer, "alone")  # idle: handed over at once
        await asyncio.gather(*(_one(queue, writer, f"burst{i}") for i in range(3)))
        # the writer is busy now: a call, and another a moment later
        first = asyncio.create_task(_one(queue, writer, "a"))
        await asyncio.sleep(0.02)
        await asyncio.gather(first, _one(queue, writer, "b"))
        await _one(queue, writer, "c")  # the last group held two: still busy
        await _one(queue, writer, "d")  # the last held one: idle again, no wait
    finally:
        await queue.stop()
        await writer
    return [len(g) for g in groups]


async def test_a_busy_writer_lingers_for_more_calls_and_a_lone_call_does_not_wait() -> None:
    assert await _sizes(linger=0.2) == [1, 3, 2, 1, 1]
    assert await _sizes(linger=0.0) == [1, 3, 1, 1, 1, 1]


async def test_a_lone_call_after_a_quiet_writer_is_not_delayed() -> None:
    queue = CommitQueue(linger=5.0)  # a linger that would fail the test if it applied
    groups: list[list[Pending]] = []
    writer = asyncio.create_task(_writer(queue, groups))
    try:
        for i in range(5):
            await asyncio.wait_for(_one(queue, writer, f"k{i}"), 1.0)
    finally:
        await queue.stop()
        await writer
    assert [len(g) for g in groups] == [1, 1, 1, 1, 1]
