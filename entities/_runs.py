"""Runs recorded inside a wake (``ctx.record_run()``): a ``runs`` row each, keyed
``{wake}.run{n}``, written when the run starts and again when it ends (status, timing, finish
reason, response, and for agent runs the model tokens used and the error)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from streams import Operation

__all__ = ["RunBook", "RunHandle"]

Emit = Callable[[str, str, Any, Operation], None]


class RunBook:
    """A wake's recorded runs: those still open, and the model tokens (input, output) of
    those ended."""

    def __init__(self, emit: Emit, now: Callable[[], float]) -> None:
        self.emit = emit
        self.now = now
        self.open: list[RunHandle] = []
        self.tokens = (0, 0)

    def close(self) -> None:
        """The wake ended: what a handle still held records goes nowhere (it would come after
        the wake's commit), and the book lets go of its context."""
        self.emit, self.now = _nowhere, time.time


def _nowhere(collection: str, key: str, value: Any, operation: Operation) -> None:
    """An :data:`Emit` that records nothing."""


class RunHandle:
    """An explicitly recorded run (``ctx.record_run()``); end it with :meth:`end`."""

    def __init__(self, book: RunBook, key: str) -> None:
        self._book = book
        self.key = key
        self._response: list[str] = []
        self._started = book.now()
        self.ended = False
        book.emit("runs", key, {"status": "started", "started_at": self._started}, "insert")
        book.open.append(self)

    def attach_response(self, text: str) -> None:
        """Add text to the run's recorded response."""
        self._response.append(text)

    def end(
        self,
        status: str = "completed",
        finish_reason: str | None = None,
        *,
        usage: tuple[int, int] | None = None,
        error: str | None = None,
    ) -> None:
        """Record the run's outcome (a run left open is ended when its wake commits, with the
        wake's outcome and ``finish_reason="wake_ended"``); ``usage``: the model tokens it used
        (input, output), added to the wake's run row too; ``error``: why it failed."""
        self.ended = True
        book = self._book
        if self in book.open:  # no cycle left behind once it is ended
            book.open.remove(self)
        now = book.now()
        value = {
            "status": status,
            "started_at": self._started,
            "ended_at": now,
            "duration_ms": round((now - self._started) * 1000, 3),
            "finish_reason": finish_reason,
            "response": "".join(self._response) or None,
        }
        if usage is not None:
            value["input_tokens"], value["output_tokens"] = usage
            book.tokens = (book.tokens[0] + usage[0], book.tokens[1] + usage[1])
        if error is not None:
            value["error"] = error
        book.emit("runs", self.key, value, "update")
