"""Manifest entries: the durable record of what a wake set up (children, sources, schedules...).

Each entry is a row of the built-in ``manifests`` collection, keyed by an explicit, stable id,
and is one member of a pydantic union tagged by ``kind``. ``first_wake`` is true while an entity
has no manifest entries.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Discriminator, Field, TypeAdapter

__all__ = [
    "ChildEntry",
    "ContextEntry",
    "EffectEntry",
    "ManifestEntry",
    "ScheduleEntry",
    "SharedStateEntry",
    "SourceEntry",
    "manifest_adapter",
]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = 1
    id: str


class ChildEntry(_Entry):
    """A child this entity spawned; ``wake`` says when its completion wakes the parent."""

    kind: Literal["child"] = "child"
    entity_type: str
    entity_url: str
    wake: Any = "run_finished"
    observed: bool = True


class SourceEntry(_Entry):
    """Something this entity observes (another entity, a shared db, tags, cron)."""

    kind: Literal["source"] = "source"
    source_type: Literal["entity", "db", "entities", "cron"]
    source_ref: str
    wake: Any = None
    config: dict[str, Any] = Field(default_factory=dict)


class SharedStateEntry(_Entry):
    """A shared-state stream this entity created or connected to."""

    kind: Literal["shared_state"] = "shared_state"
    mode: Literal["create", "connect"]
    collections: dict[str, Any] = Field(default_factory=dict)


class ScheduleEntry(_Entry):
    """A cron schedule or a future send, fired by the scheduler."""

    kind: Literal["schedule"] = "schedule"
    schedule_type: Literal["cron", "future_send"]
    expression: str | None = None
    timezone: str | None = None
    fire_at: float | None = None
    target_url: str | None = None
    payload: Any = None
    message_type: str | None = None
    status: Literal["pending", "sent", "failed", "active", "cancelled"] = "pending"
    # a delayed send, once delivered: when (epoch seconds) and how late after ``fire_at`` (ms)
    sent_at: float | None = None
    late_ms: float | None = None
    reason: str | None = None  # why a delayed send failed (its target was stopped or deleted)


class ContextEntry(_Entry):
    """A durable context entry included in every model call."""

    kind: Literal["context"] = "context"
    name: str
    content: str
    attrs: dict[str, Any] = Field(default_factory=dict)
    inserted_at: float = 0.0


class EffectEntry(_Entry):
    """A registered side effect (a function reference and its configuration)."""

    kind: Literal["effect"] = "effect"
    function_ref: str
    config: dict[str, Any] = Field(default_factory=dict)


ManifestEntry: TypeAlias = Annotated[
    ChildEntry | SourceEntry | SharedStateEntry | ScheduleEntry | ContextEntry | EffectEntry,
    Discriminator("kind"),
]
manifest_adapter: TypeAdapter[ManifestEntry] = TypeAdapter(ManifestEntry)
