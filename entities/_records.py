"""Records the runtime stores outside entity streams (side table ``entity``), and event names.

The entity record is the per-entity bookkeeping row: status, acknowledged offset, lease (owner,
fencing epoch, expiry), the in-flight wake and retry state. It changes only by compare-and-set,
which is how leases and fencing work on every backend.
"""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict

__all__ = [
    "BUILTIN_COLLECTIONS",
    "ENTITY_NS",
    "PENDING_NS",
    "SCHEDULE_NS",
    "SNAPSHOT_NS",
    "TIMER_NS",
    "WORKER_NS",
    "EntityRecord",
    "Inflight",
]

ENTITY_NS = "entity"
PENDING_NS = "pending"
SNAPSHOT_NS = "entity-snapshot"
WORKER_NS = "worker"  # key: worker id -> {"expires": ..., "pid": ..., "host": ...} (presence)

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
