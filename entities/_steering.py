"""Steering: messages sent with ``mode="steer"`` handed to an agent run that is going.

Before each model round the agent asks for the steering messages that arrived after its
wake's range (:meth:`Steering.take`, journaled as a step of the run, so a re-run of the wake
takes the same ones). Each taken message becomes a user turn of the run; the wake records it
as taken with an ``update`` of its ``inbox`` row carrying ``steered_into`` (the wake id), so
the next wake folds it away instead of delivering it again (see
:func:`entities._pipeline.load.wake_event`), and the run's reply answers it too. A steering
message no run takes (none was going, or the last round had passed) stays an ordinary
message for the next wake.

Reading costs what arrived since the wake began (its own live output included), read on from
where the previous round stopped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Steering"]

_FIELDS = ("payload", "message_type", "from")

Reader = Callable[[str, str], Awaitable[tuple[list[dict[str, Any]], str]]]


class Steering:
    """The steering messages of one wake, read on from the end of its range."""

    def __init__(self, read: Reader, url: str, start: str) -> None:
        self._read = read
        self._url = url
        self._offset = start
        self._found: dict[str, dict[str, Any]] = {}  # key -> the message's row, in order
        self._taken: set[str] = set()

    async def take(self) -> list[dict[str, Any]]:
        """The steering messages not yet taken, oldest first: ``{key, payload, message_type,
        from}`` each; they count as taken from now on. Raises whatever the store raises."""
        while True:
            events, offset = await self._read(self._url, self._offset)
            for item in events:
                if item.get("type") == "inbox":
                    self._fold(item)
            self._offset = offset
            if len(events) < 1000:
                break
        fresh: list[dict[str, Any]] = []
        for key, value in self._found.items():
            if key not in self._taken:
                self._taken.add(key)
                row = {"key": key, **{f: value.get(f) for f in _FIELDS}}
                if value.get("attachments"):
                    row["attachments"] = value["attachments"]
                fresh.append(row)
        return fresh

    def mark(self, key: str) -> None:
        """Count ``key`` as taken (by an earlier attempt of the wake, as its journal says)."""
        self._taken.add(key)

    def _fold(self, item: dict[str, Any]) -> None:
        key, value = item.get("key"), item.get("value") or {}
        operation = (item.get("headers") or {}).get("operation")
        if not isinstance(key, str):
            return
        if operation == "delete" or value.get("steered_into"):
            self._found.pop(key, None)
        elif operation == "update":
            if key in self._found:
                self._found[key] = {**self._found[key], **value}
        elif value.get("mode") == "steer":
            self._found[key] = dict(value)
