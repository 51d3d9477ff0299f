"""Calls handed from one thread's event loop to another's, one wake-up of the other per batch.

``entities serve`` runs its worker on a thread and an event loop of its own: the server's
commits hand the worker what they wrote, the worker's commits hand callers on the server's loop
their replies. ``loop.call_soon_threadsafe`` wakes the other loop each time (a write to its
self-pipe) and, with two busy threads in one process, contends for the GIL: a worker's group
commit answering many callers cost a wake-up each. :func:`soon` queues the call in the target
loop's *outbox* and wakes that loop only when the outbox was empty; the loop then runs
everything queued meanwhile, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["soon"]


class _Outboxes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[Any], object], Any]]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, fn: Callable[[Any], object], arg: Any) -> None:
        with self._lock:
            box = self._boxes.get(loop)
            if box is not None and not loop.is_closed():  # its drain has not run yet
                box.append((fn, arg))
                return
            self._boxes[loop] = [(fn, arg)]
        try:
            loop.call_soon_threadsafe(self._drain, loop)
        except RuntimeError:  # that loop closed meanwhile
            with self._lock:
                self._boxes.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            box = self._boxes.pop(loop, [])
        for fn, arg in box:
            fn(arg)


_OUTBOXES = _Outboxes()


def soon(
    loop: asyncio.AbstractEventLoop | None, fn: Callable[[Any], object], arg: Any = None
) -> None:
    """Run ``fn(arg)`` on ``loop`` soon, from its own thread or another, after the calls handed
    to it before (a no-op without a loop or once it has closed)."""
    if loop is None or loop.is_closed():
        return
    if _running() is loop:
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            loop.call_soon(fn, arg)
    else:
        _OUTBOXES.put(loop, fn, arg)


def _running() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
