"""One clock object for every timer in the runtime, replaceable by a virtual clock in tests."""

from __future__ import annotations

import time

import anyio

__all__ = ["Clock", "SystemClock", "VirtualClock"]


class Clock:
    """The interface: wall time in seconds since the epoch, and sleeping on that time."""

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of this clock's time."""
        raise NotImplementedError

    @property
    def virtual(self) -> bool:
        return False


class SystemClock(Clock):
    """Real time."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))


class VirtualClock(Clock):
    """Time that moves only when told to: ``advance(seconds)`` or ``set(t)``.

    Sleepers wake when the clock passes their deadline, so timers, retries and schedules can be
    tested without waiting.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._changed = anyio.Event()

    def now(self) -> float:
        return self._now

    @property
    def virtual(self) -> bool:
        return True

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake sleepers that are due."""
        self.set(self._now + max(0.0, seconds))

    def set(self, now: float) -> None:
        """Jump to ``now`` (never backwards)."""
        self._now = max(self._now, now)
        self._changed.set()
        self._changed = anyio.Event()

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + seconds
        while self._now < deadline:
            await self._changed.wait()
