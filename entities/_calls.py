"""Calling user code that may be sync or async."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["call_maybe_async"]


async def call_maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async function and return its result (raises what ``fn`` raises)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result
