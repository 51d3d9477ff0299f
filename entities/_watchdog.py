"""The worker's watchdog: it names the entity whose handler blocks the event loop.

An ``async def`` handler that calls something blocking (``time.sleep``, a synchronous HTTP
client, a long computation) holds the whole loop: every other wake on it, the heartbeats that
renew leases, and (when a server shares the loop) the HTTP API. A task on the loop beats every
``BEAT_SECONDS``; a thread watches the beats. When the loop has not beaten for over
``BLOCKED_SECONDS`` (past the beat's own period), the thread logs one WARNING for that blocking
episode, naming the entity whose handler runs on the loop's thread at that moment and the line
it is at (found on the thread's stack), and, when the loop runs again, one INFO line with how
long it was blocked. The thread reads while the loop is blocked, so the culprit is named while
it blocks, not after it returned.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import FrameType

import anyio

from ._run import WakeRunner

__all__ = ["BEAT_SECONDS", "BLOCKED_SECONDS", "Watchdog"]

logger = logging.getLogger("entities.worker")

# how often the loop beats, and the watching thread looks (seconds)
BEAT_SECONDS = 0.25
# a loop that has not gone round for this long (beyond a beat) is blocked (seconds)
BLOCKED_SECONDS = 1.0

_RUN_CODE = WakeRunner._run.__code__  # the frame of a wake whose handler is on the stack


class Watchdog:
    """Watches the event loop that ``runner``'s wakes run on: ``await watchdog.run()`` (until
    cancelled) in a task of that loop."""

    def __init__(self, runner: WakeRunner, *, blocked_seconds: float = BLOCKED_SECONDS) -> None:
        self.runner = runner
        self.blocked_seconds = blocked_seconds
        self.beat = time.monotonic()  # written by the loop, read by the watching thread
        self.episodes = 0  # blocking episodes seen so far

    async def run(self) -> None:
        """Beat until cancelled, with a thread watching the beats (it ends with this)."""
        done = threading.Event()
        loop_thread = threading.get_ident()
        self.beat = time.monotonic()
        watcher = threading.Thread(
            target=self._watch, args=(loop_thread, done), name="entities-watchdog", daemon=True
        )
        watcher.start()
        try:
            while True:
                await anyio.sleep(BEAT_SECONDS)
                self.beat = time.monotonic()
        finally:
            done.set()

    def _watch(self, loop_thread: int, done: threading.Event) -> None:
        blocked_since: float | None = None  # the last beat before the episode
        while not done.wait(BEAT_SECONDS):
            beat = self.beat
            if time.monotonic() - beat <= BEAT_SECONDS + self.blocked_seconds:
                if blocked_since is not None and beat != blocked_since:
                    blocked = max(0.0, beat - blocked_since - BEAT_SECONDS)
                    logger.info("the worker's event loop runs again after %.1f s", blocked)
                    blocked_since = None
                continue
            if blocked_since is None:  # one warning per episode
                blocked_since = beat
                self.episodes += 1
                self._warn(loop_thread, time.monotonic() - beat - BEAT_SECONDS)

    def _warn(self, loop_thread: int, seconds: float) -> None:
        frame = sys._current_frames().get(loop_thread)
        culprit, where = _culprit(frame)
        if culprit is not None:
            logger.warning(
                "the handler of %s has blocked the worker's event loop for %.1f s (at %s): "
                "other wakes, lease renewals and, under `entities serve`, nothing else on "
                "this loop runs meanwhile; await instead, or make the handler a plain def "
                "(it then runs on a thread)",
                culprit, seconds, where,
                extra={"url": culprit, "blocked_ms": round(seconds * 1000)},
            )  # fmt: skip
            return
        running = sorted(self.runner.running)
        logger.warning(
            "the worker's event loop has been blocked for %.1f s (at %s); wakes running: %s",
            seconds, where, ", ".join(running) or "none",
            extra={"urls": running, "blocked_ms": round(seconds * 1000)},
        )  # fmt: skip


def _culprit(frame: FrameType | None) -> tuple[str | None, str]:
    """The entity whose wake is on the stack that ends in ``frame`` (``None`` if no wake is),
    and where the stack is (``file:line in function``)."""
    if frame is None:
        return None, "unknown"
    code = frame.f_code
    where = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
    current: FrameType | None = frame
    while current is not None:
        if current.f_code is _RUN_CODE:
            run = current.f_locals.get("run")
            claim = getattr(run, "claim", None)
            if claim is not None:
                return str(claim.url.url), where
        current = current.f_back
    return None, where
