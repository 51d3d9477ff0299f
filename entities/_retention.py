"""The retention policy of an entity type: what compaction (:mod:`._compaction`) may remove from
its entities' streams, and when. Given to ``registry.define(..., retention=Retention(...))``."""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import DefinitionError

__all__ = ["DEFAULT_JOURNAL_WINDOW", "Retention"]

DEFAULT_JOURNAL_WINDOW = 7 * 24 * 3600.0  # seconds: replay is promised for a week


@dataclass(frozen=True, slots=True)
class Retention:
    """What compaction removes from an entity's stream. Surviving events keep their offsets.

    * ``text_deltas``: once a run has ended, its streamed partials (``text_deltas`` and
      ``reasoning_deltas``) go; the ``texts`` and ``reasoning`` rows hold the whole. On by
      default.
    * ``journal_window`` (seconds, default 7 days; ``None``: keep for ever): the journal
      (``steps``) of a wake older than this goes. ``entities replay`` is promised within the
      window; an older wake is reported as compacted, not replayed.
    * ``keep_for`` (seconds; default ``None``: never): the stream's prefix before a snapshot
      older than this is truncated. Off by default: the prefix holds the conversation history
      that ``timeline_messages`` and the console read, and replies and replays of wakes before
      the cut. The entity's own view is kept whole (it is folded from the snapshot).

    Raises:
        DefinitionError: a window that is not a positive number of seconds.
    """

    text_deltas: bool = True
    journal_window: float | None = DEFAULT_JOURNAL_WINDOW
    keep_for: float | None = None

    def __post_init__(self) -> None:
        for name in ("journal_window", "keep_for"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise DefinitionError(f"{name} must be a positive number of seconds, not {value}")
