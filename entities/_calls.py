"""Calling user code that may be sync or async."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import anyio.to_thread

__all__ = ["call_maybe_async", "call_user"]


async def call_maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async function and return its result (raises what ``fn`` raises)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


@functools.lru_cache(maxsize=256)  # a handler is asked about on every wake
def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` only makes a coroutine (an ``async def``, a partial or bound
    method of one, or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (an async __call__, not callability)
    )


async def call_user(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a handler or hook and return its result (raises what ``fn`` raises).

    An ``async def`` runs on the event loop. Anything else runs on a worker thread
    (``anyio.to_thread``, at most 40 at once per loop), so a plain ``def`` that blocks
    (``time.sleep``, a synchronous HTTP client) does not stall the loop and the other wakes on
    it; if it returns an awaitable, that is awaited on the loop. When the call is cancelled
    (a kill, a timeout, the end of a drain) the thread is abandoned: it runs to its end, but
    nothing it buffered afterwards is committed.
    """
    try:
        is_async = _is_async(fn)
    except TypeError:  # not hashable: look each time
        is_async = _is_async.__wrapped__(fn)
    if is_async:
        return await fn(*args)
    result = await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    if inspect.isawaitable(result):
        return await result
    return result
