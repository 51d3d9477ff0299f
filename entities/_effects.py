"""What a wake buffers: its durable effects, committed in one transaction when it ends.

A :class:`~entities.HandlerContext` fills an :class:`Effects` while the handler runs; the commit
stage (:mod:`entities._pipeline.commit`) turns one or more of them (the handler's, and an
``on_error`` hook's) into store operations. Nothing here touches a store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._observe import SharedState
from ._timers import TimerValue
from ._urls import EntityURL

__all__ = ["Effects", "PendingSend", "PendingSpawn", "PendingTimer", "response_of"]


@dataclass(slots=True)
class PendingSend:
    """A message to another entity (or this one), delivered when the wake commits."""

    target: EntityURL
    payload: Any
    message_type: str | None
    key: str


@dataclass(slots=True)
class PendingSpawn:
    """A child created when the wake commits (args and message validated already)."""

    target: EntityURL
    args: dict[str, Any]
    tags: dict[str, str]
    initial_message: Any
    initial_message_type: str | None
    wake: str | None = "run_finished"


@dataclass(slots=True)
class PendingTimer:
    """A timer to arm (``timer``) or, with ``timer=None``, a schedule to cancel;
    ``replaces`` is the key of the timer row it supersedes."""

    timer: TimerValue | None
    schedule_id: str
    replaces: str | None = None


@dataclass(slots=True)
class Effects:
    """The buffered durable effects of one wake."""

    own: list[dict[str, Any]] = field(default_factory=list)  # change events for its own stream
    timers: list[PendingTimer] = field(default_factory=list)
    observers: dict[str, bytes | None] = field(default_factory=dict)  # index key -> value
    shared: dict[str, SharedState] = field(default_factory=dict)  # db id -> handle (writes)
    new_dbs: set[str] = field(default_factory=set)
    sends: list[PendingSend] = field(default_factory=list)
    spawns: list[PendingSpawn] = field(default_factory=list)
    journal: list[dict[str, Any]] = field(default_factory=list)  # not yet flushed
    replies: list[Any] = field(default_factory=list)


def response_of(effects: Sequence[Effects]) -> Any:
    """What a run answered, as a parent or a ``run_finished`` observer sees it: ``None``
    without replies, the reply itself for one, the list for several."""
    replies = [reply for e in effects for reply in e.replies]
    return None if not replies else replies[0] if len(replies) == 1 else replies
