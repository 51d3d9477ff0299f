"""Observation: wake an entity when another entity, a shared-state db or a tag membership
changes, or on a cron expression.

``await ctx.observe(source, wake=Wake(...))`` registers the observer in the side table
(namespace ``observer``, key ``{source key}|{observer url}``) and records a ``source`` manifest
entry; it re-attaches on every wake (call it each time, as the handle is per wake). Each
commit that changes the observers of an entity also writes that entity's *generation* row
(key ``{url}|``, a fresh token), so a worker may keep the observers of the entities it runs and
check in each wake's commit that they are still current (see ``_pipeline.deliver``). When a wake of
the observed entity commits, its commit looks up the observers of that entity and, in the same
transaction, appends a ``wakes`` event to each matching observer (or arms its debounce timer).

Sources: :func:`entity`, :func:`db` (a stream made by ``ctx.mkdb``), :func:`entities` (tag
membership) and :func:`cron`. An attach to something that does not exist raises; it never
looks like empty state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from streams import KvPut, Operation

from ._collections import CollectionDef, Collections
from ._events import change, new_token
from ._urls import check_segment, parse_url

__all__ = [
    "OBSERVER_NS",
    "SharedState",
    "Source",
    "Wake",
    "cron",
    "db",
    "entities",
    "entity",
    "generation_key",
    "generation_ops",
    "matches",
]

OBSERVER_NS = "observer"


def generation_key(url: str) -> str:
    """The key of the generation row of entity ``url``'s observers (it sorts first among
    them: a scan of their prefix reads it with them, in one snapshot)."""
    return f"{url}|"


def generation_ops(index_keys: Iterable[str]) -> list[KvPut]:
    """New generation rows for the observed entities whose observer rows (``index_keys``,
    ``{source key}|{observer url}``) a commit writes or removes."""
    sources = {key.rpartition("|")[0] for key in index_keys}
    return [
        KvPut(OBSERVER_NS, generation_key(source), new_token())
        for source in sorted(sources)
        if source.startswith("/")  # an entity (db and tag sources are read as they are)
    ]


@dataclass(frozen=True, slots=True)
class Wake:
    """When an observation wakes the observer.

    ``on="run_finished"``: after each run of the source (with its reply as ``response`` when
    ``include_response``). ``on="change"``: when the source's ``collections`` change (all if
    ``None``) with one of ``ops`` (insert/update/delete; all if ``None``); ``debounce_ms`` wakes
    that long after the last change instead of at once; ``timeout_ms`` also wakes when nothing
    changed for that long (a heartbeat).
    """

    on: Literal["run_finished", "change"] = "change"
    collections: tuple[str, ...] | None = None
    ops: tuple[str, ...] | None = None
    debounce_ms: int | None = None
    timeout_ms: int | None = None
    include_response: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "on": self.on,
            "collections": None if self.collections is None else list(self.collections),
            "ops": None if self.ops is None else list(self.ops),
            "debounce_ms": self.debounce_ms,
            "timeout_ms": self.timeout_ms,
            "include_response": self.include_response,
        }

    @classmethod
    def parse(cls, value: Wake | str | Mapping[str, Any] | None) -> Wake:
        if value is None:
            return cls()
        if isinstance(value, Wake):
            return value
        if isinstance(value, str):
            if value not in ("run_finished", "change"):
                raise ValueError(f"unknown wake condition {value!r}")
            return cls(on=value)  # type: ignore[arg-type]
        data = dict(value)
        for name in ("collections", "ops"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Source:
    """Something an entity can observe (build it with :func:`entity`, :func:`db`,
    :func:`entities` or :func:`cron`)."""

    type: Literal["entity", "db", "entities", "cron"]
    ref: str
    schema: Mapping[str, CollectionDef] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The observer-index key of the source."""
        if self.type == "entity":
            return self.ref
        return f"{self.type}:{self.ref}"

    @property
    def manifest_id(self) -> str:
        return f"source:{self.type}:{self.ref}"


def entity(url: str) -> Source:
    """Observe the entity at ``url``.

    Raises:
        InvalidEntityURL: ``url`` is not ``/type/id``.
    """
    return Source("entity", parse_url(url).url)


def db(id: str, schema: Mapping[str, CollectionDef] | None = None) -> Source:
    """Observe (and read and write) the shared-state db ``id`` made by ``ctx.mkdb``.

    Raises:
        InvalidEntityURL: ``id`` is not a valid segment.
    """
    return Source("db", check_segment(id, "db id"), dict(schema or {}))


def entities(*, tags: Mapping[str, str]) -> Source:
    """Observe membership: entities whose tags include every ``key=value`` of ``tags``."""
    ref = ",".join(f"{k}={v}" for k, v in sorted(tags.items()))
    return Source("entities", ref, config={"tags": dict(tags)})


def cron(expression: str, *, timezone: str = "UTC") -> Source:
    """Wake on a cron expression (like ``ctx.schedule_cron`` with an id from the expression)."""
    return Source("cron", expression, config={"timezone": timezone})


def db_stream(id: str) -> str:
    """The stream path of shared-state db ``id``."""
    return f"_shared/{id}/main"


def matches(wake: Mapping[str, Any], changes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The changes (``{collection, kind, key}``) a ``change`` observer cares about."""
    collections = wake.get("collections")
    ops = wake.get("ops")
    return [
        dict(c)
        for c in changes
        if (collections is None or c["collection"] in collections)
        and (ops is None or c["kind"] in ops)
    ]


def change_summary(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{collection, kind, key}`` for each change event (user collections without ``state:``)."""
    out = []
    for e in events:
        type_ = str(e.get("type", ""))
        name = type_[6:] if type_.startswith("state:") else type_
        out.append({"collection": name, "kind": e["headers"]["operation"], "key": e.get("key")})
    return out


class SharedState:
    """A shared-state db as seen in one wake: ``handle.<collection>`` reads the committed rows
    plus this wake's writes; writes are committed with the wake."""

    def __init__(
        self, id: str, schema: Mapping[str, CollectionDef], view: dict[str, dict[str, Any]]
    ) -> None:
        self.id = id
        self._view = view
        self.events: list[dict[str, Any]] = []
        self._collections = Collections(self, dict(schema))

    def _emit(
        self, type_: str, key: str, value: Any, operation: Operation, old: Any = None
    ) -> None:
        self.events.append(change(type_, key, value, None, operation, old=old))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._collections, name)

    def __repr__(self) -> str:
        return f"SharedState({self.id!r})"


def observer_value(observer: str, source: Source, wake: Wake) -> bytes:
    return orjson.dumps(
        {
            "observer": observer,
            "source_type": source.type,
            "source_ref": source.ref,
            "wake": wake.to_json(),
        }
    )
