"""Records the runtime stores outside entity streams (side-table namespaces), event names, and
the views of an entity the control plane hands out.

The entity record is the per-entity bookkeeping row: status, acknowledged offset, lease (owner,
fencing epoch, expiry), the in-flight wake and retry state. It changes only by compare-and-set,
which is how leases and fencing work on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from ._events import from_iso, iso

__all__ = [
    "APP_NS",
    "BUILTIN_COLLECTIONS",
    "DEAD_NS",
    "ENTITY_NS",
    "PAUSED_NS",
    "PENDING_NS",
    "REPLY_NS",
    "SCHEDULE_NS",
    "SNAPSHOT_NS",
    "TAG_NS",
    "TIMER_NS",
    "WORKER_NS",
    "DeadLetter",
    "EntityInfo",
    "EntityRecord",
    "Inflight",
    "Outcome",
    "SendReceipt",
    "info_of",
]

ENTITY_NS = "entity"
PENDING_NS = "pending"
SNAPSHOT_NS = "entity-snapshot"
WORKER_NS = "worker"  # key: worker id -> {"expires": ..., "pid": ..., "host": ...} (presence)
TAG_NS = "tag"  # key: "{url}\n{tag}" -> value (what ``ps --tag`` and tag observers read)
APP_NS = "app"  # key: entity type -> where its code was loaded from (for replay)
PAUSED_NS = "paused"  # key: URL -> {"reason", "from", "at"} while the entity is paused (signals)
REPLY_NS = "reply"  # the reply index: see entities._replies
DEAD_NS = "dead"  # key: "{url}|{wake_id}" -> DeadLetter (a wake given up, until retried/discarded)

# Collection (event ``type``) names in an entity's main stream.
BUILTIN_COLLECTIONS = (
    "entity_created",
    "inbox",
    "wakes",
    "runs",
    "steps",
    "texts",
    "text_deltas",
    "tool_calls",
    "errors",
    "manifests",
    "tags",
    "context",
    "signals",
    "entity_stopped",
    "approvals",
    "reasoning",
    "reasoning_deltas",
)
WAKE_TYPES = frozenset({"inbox", "wakes", "entity_created"})
TIMER_NS = "timer"  # key: "{due:017.6f}|{url}|{schedule id}" -> TimerValue
SCHEDULE_NS = "schedule"  # key: "{url}|{schedule id}" -> the current timer key
# Collections folded into the handler's view (the rest is timeline, read on demand).
VIEW_TYPES = frozenset({"entity_created", "manifests", "tags", "context"})


class Inflight(BaseModel):
    """The wake being processed: its event range and how many attempts it has had."""

    model_config = ConfigDict(extra="forbid")
    wake_id: str
    from_offset: str
    to_offset: str
    attempt: int = 1


class EntityRecord(BaseModel):
    """Bookkeeping of one entity (side table ``entity``, key = URL)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["entity"] = "entity"
    v: int = 1
    url: str
    type: str
    id: str
    parent: str | None = None
    parent_wake: Literal["run_finished"] | None = None
    created_at: float
    status: Literal["idle", "running", "stopped"] = "idle"
    acked: str = "-1"
    epoch: int = 0
    owner: str | None = None
    lease_expires: float = 0.0
    inflight: Inflight | None = None
    retry_at: float | None = None
    runs: int = 0
    last_active: float = 0.0

    def dump(self) -> bytes:
        # an exact-size copy: orjson's result keeps a 4 KiB buffer, and these bytes are cached
        return bytes(bytearray(orjson.dumps(self.model_dump(mode="json"))))

    @classmethod
    def load(cls, data: bytes) -> EntityRecord:
        return cls.model_validate(orjson.loads(data))


class DeadLetter(BaseModel):
    """A wake given up after its last attempt (side table ``dead``, key ``{url}|{wake_id}``):
    its events stay in the entity's stream, acknowledged; retrying delivers its messages again
    as a new wake."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["dead_letter"] = "dead_letter"
    v: int = 1
    url: str
    type: str
    wake_id: str
    from_offset: str
    to_offset: str
    attempts: int
    error: str
    error_type: str
    at: float  # when it was given up (epoch seconds)
    messages: int = 0  # inbox messages in its range

    @property
    def id(self) -> str:
        """The id users name it by: ``{type}:{entity id}:{wake_id}`` (``:`` is in no segment)."""
        return f"{self.type}:{self.url.rsplit('/', 1)[1]}:{self.wake_id}"

    @property
    def key(self) -> str:
        return f"{self.url}|{self.wake_id}"

    @staticmethod
    def key_of(id: str) -> str | None:
        """The side-table key of the dead letter ``id`` (``None``: not an id's shape)."""
        parts = id.split(":")
        if len(parts) != 3 or not all(parts):
            return None
        return f"/{parts[0]}/{parts[1]}|{parts[2]}"

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"kind", "v"})
        data["id"] = self.id
        data["time"] = iso(self.at)
        return data


@dataclass(slots=True)
class Outcome:
    """What became of one message: the replies to it, and the status of the wake that took it
    (``pending`` until a wake ran it; ``failed`` while it is being retried; then
    ``completed``, ``dead_lettered``, ``cancelled`` or ``interrupted``) with that wake's
    error, if any."""

    replies: list[Any] = field(default_factory=list)
    status: str = "pending"
    error: str | None = None

    @property
    def failed(self) -> bool:
        """Whether the wake was given up (dead-lettered or cancelled): no reply will come."""
        return self.status in ("dead_lettered", "cancelled", "interrupted")


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """What ``send`` returns: the message key and the offset after it in the entity's stream."""

    url: str
    key: str
    offset: str

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "key": self.key, "offset": self.offset}


@dataclass(frozen=True, slots=True)
class EntityInfo:
    """An entity's bookkeeping as seen from outside."""

    url: str
    type: str
    id: str
    status: str
    parent: str | None
    created_at: float
    last_active: float
    runs: int
    acked: str
    epoch: int
    owner: str | None
    pending: bool
    tags: dict[str, str] = field(default_factory=dict)
    queue: int = 0  # wake events waiting (inbox messages, child/observer/cron wakes)
    dead_letters: int = 0  # wakes given up, not yet retried or discarded

    @property
    def stream(self) -> str:
        return f"{self.type}/{self.id}/main"

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "type": self.type,
            "id": self.id,
            "status": self.status,
            "parent": self.parent,
            "tags": self.tags,
            "created_at": iso(self.created_at),
            "last_active": iso(self.last_active) if self.last_active else None,
            "runs": self.runs,
            "pending": self.pending,
            "queue": self.queue,
            "dead_letters": self.dead_letters,
            "streams": {"main": f"{self.url}/main"},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EntityInfo:
        """The info :meth:`to_json` gave (fields it leaves out take their defaults), so that
        ``to_json`` gives ``data`` again."""
        last = data.get("last_active")
        return cls(
            url=data["url"],
            type=data["type"],
            id=data["id"],
            status=data["status"],
            parent=data.get("parent"),
            created_at=from_iso(data["created_at"]),
            last_active=0.0 if last is None else from_iso(last),
            runs=data.get("runs", 0),
            acked="-1",
            epoch=0,
            owner=None,
            pending=data.get("pending", False),
            tags=dict(data.get("tags") or {}),
            queue=data.get("queue", 0),
            dead_letters=data.get("dead_letters", 0),
        )


def info_of(
    record: EntityRecord,
    pending: bool,
    tags: dict[str, str],
    dead_letters: int = 0,
    *,
    paused: bool = False,
    orphaned: bool = False,
) -> EntityInfo:
    """The outside view of ``record``: its status is ``orphaned`` (unless stopped) when
    ``orphaned`` (the running code lacks its type, so nothing runs it until the type returns),
    ``paused`` while it is paused and not running, ``failed`` while it is idle with dead
    letters (``ps --status failed``)."""
    status: str = record.status
    if orphaned and status != "stopped":
        status = "orphaned"
    elif status == "idle" and paused:
        status = "paused"
    elif status == "idle" and dead_letters > 0:
        status = "failed"
    return EntityInfo(
        url=record.url,
        type=record.type,
        id=record.id,
        status=status,
        parent=record.parent,
        created_at=record.created_at,
        last_active=record.last_active,
        runs=record.runs,
        acked=record.acked,
        epoch=record.epoch,
        owner=record.owner,
        pending=pending,
        tags=tags,
        dead_letters=dead_letters,
    )
