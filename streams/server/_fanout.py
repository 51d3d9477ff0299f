"""Shared live reads: many subscribers of one stream cost one store wait and one read.

Live readers (long-poll and SSE) that sit at the same offset of the same stream all need the
same thing: wake when data after that offset exists, then read it. :class:`Fanout` gives them
one shared :meth:`Store.wait` followed by one shared :meth:`Store.read` per ``(path, offset)``
instead of one each, so a hundred SSE subscribers add no database load beyond the first and wake
exactly once per change. It keeps no data of its own: results live only while the calls that
share them are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .. import ReadResult, Store

__all__ = ["Fanout"]

T = TypeVar("T")
Key = tuple[str, str]


@dataclass(slots=True)
class _Flight(Generic[T]):
    task: asyncio.Future[T]
    users: int = 0
    memo: dict[str, object] = field(default_factory=dict)


def _consume(task: asyncio.Future[object]) -> None:
    # Retrieve the outcome so a failure nobody awaited is not reported as "never retrieved".
    if not task.cancelled():
        task.exception()


class Fanout:
    """Single-flight ``wait`` and ``read`` over one store.

    Args:
        store: the store to read.
        max_wait_s: how long one shared wait may run before it is renewed.
        read_max_messages, read_max_bytes: the size of one shared read.
    """

    def __init__(
        self, store: Store, *, max_wait_s: float, read_max_messages: int, read_max_bytes: int
    ) -> None:
        self._store = store
        self._max_wait_s = max_wait_s
        self._limit = read_max_messages
        self._max_bytes = read_max_bytes
        self._nexts: dict[Key, _Flight[ReadResult | None]] = {}
        self._reads: dict[Key, _Flight[ReadResult]] = {}

    def _flight(
        self, table: dict[Key, _Flight[T]], key: Key, start: Callable[[], Awaitable[T]]
    ) -> _Flight[T]:
        flight = table.get(key)
        if flight is None or flight.task.done():
            task: asyncio.Future[T] = asyncio.ensure_future(start())
            flight = _Flight(task)
            table[key] = flight

            def forget(done: asyncio.Future[T], flight: _Flight[T] = flight) -> None:
                _consume(done)  # type: ignore[arg-type]
                if table.get(key) is flight:
                    del table[key]

            task.add_done_callback(forget)
        return flight

    async def _wait_then_read(self, path: str, offset: str) -> ReadResult | None:
        if not await self._store.wait(path, offset, self._max_wait_s):
            return None
        return await self._store.read(
            path, offset, limit=self._limit, max_bytes=self._max_bytes, renew_ttl=False
        )

    async def next(
        self,
        path: str,
        offset: str,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[ReadResult, dict[str, object]] | None:
        """Wait (at most ``timeout``) for a change after ``offset``, then read from there.

        Shared by every caller at ``(path, offset)``; ``None`` on timeout. The result may hold
        no messages (e.g. only a close happened). The memo dict is shared by every caller of the
        same read, for what they derive from it (e.g. an encoded SSE event).

        Raises:
            StreamNotFound, StreamGone: the stream went away.
        """
        flight = self._flight(
            self._nexts, (path, offset), lambda: self._wait_then_read(path, offset)
        )
        flight.users += 1
        try:
            done, _pending = await asyncio.wait({flight.task}, timeout=timeout)
            result = flight.task.result() if done else None
            return None if result is None else (result, flight.memo)
        finally:
            flight.users -= 1
            if flight.users <= 0 and not flight.task.done():
                flight.task.cancel()

    async def read(self, path: str, offset: str) -> tuple[ReadResult, dict[str, object]]:
        """Read after ``offset`` without renewing the TTL, shared by concurrent callers.

        Returns the result and a memo dict shared by every caller of the same read, where
        callers cache what they derive from it (e.g. an encoded SSE event).

        Raises:
            StreamNotFound, StreamGone: the stream went away.
        """
        flight = self._flight(
            self._reads,
            (path, offset),
            lambda: self._store.read(
                path, offset, limit=self._limit, max_bytes=self._max_bytes, renew_ttl=False
            ),
        )
        flight.users += 1
        try:
            return await asyncio.shield(flight.task), flight.memo
        finally:
            flight.users -= 1

    async def aclose(self) -> None:
        """Cancel every shared wait still running."""
        flights: list[_Flight[Any]] = [*self._nexts.values(), *self._reads.values()]
        for flight in flights:
            flight.task.cancel()
        for flight in flights:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await flight.task
        self._nexts.clear()
        self._reads.clear()
