"""The pre-deploy check: the stored data of a deployment against the code about to serve it.

:func:`check_deploy` reads the store directly and compares it with a registry (the new code):

- entity types with live entities that the registry lacks (live: not stopped; a stopped entity
  never wakes again, so the code it would need does not matter; its data stays);
- state rows of live entities that do not validate against their collection's model once
  migrated to its version (or whose migration raises), and queued inbox messages (events after
  the entity's acknowledged offset, which the new code will handle) that do not validate against
  the type's inbox schema;
- divergences when the last N recorded wakes of each type (across its most recently active
  entities) are replayed against the new code (see :mod:`entities._replay`).

Each entity's state is folded from its snapshot plus the stream after it (as a wake loads it),
never from the start of a long stream; replay reads the whole stream of the few entities whose
wakes it replays. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from streams import StreamGone, StreamNotFound

from ._errors import EntitiesError, MigrationFailed, SchemaValidationFailed
from ._migrations import stored_row
from ._pipeline.load import load_range
from ._records import ENTITY_NS, EntityRecord
from ._registry import EntityType
from ._replay import replay
from ._runtime import Runtime
from ._urls import parse_url

__all__ = ["CheckFinding", "CheckReport", "check_deploy"]

FindingKind = Literal["missing_type", "invalid_row", "invalid_message", "divergence"]

MAX_NAMED = 5  # entities named per missing type before "and N more"
_PAGE = 1000


@dataclass(frozen=True, slots=True)
class CheckFinding:
    """One reason not to deploy: ``kind`` and a one-line ``message``, plus what it is about."""

    kind: FindingKind
    message: str
    type: str
    urls: tuple[str, ...] = ()  # the entities concerned (for a missing type: all of them)
    collection: str | None = None  # a state collection name, or "inbox"
    key: str | None = None  # the row's key, or the inbox message's key
    field: str | None = None  # the field that fails (dotted path), if one does
    wake_id: str | None = None  # a diverging wake

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "type": self.type,
            "urls": list(self.urls),
            "collection": self.collection,
            "key": self.key,
            "field": self.field,
            "wake_id": self.wake_id,
        }


@dataclass(slots=True)
class CheckReport:
    """What :func:`check_deploy` found (``ok`` when nothing)."""

    findings: list[CheckFinding] = field(default_factory=list)
    entities: int = 0  # live entities looked at
    rows: int = 0
    messages: int = 0  # queued inbox messages
    wakes: int = 0  # wakes replayed

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        """One line: what was checked, and how many findings."""
        checked = (
            f"{_count(self.entities, 'live entity', 'live entities')}, "
            f"{_count(self.rows, 'state row')}, {_count(self.messages, 'queued message')}, "
            f"{_count(self.wakes, 'wake')} replayed"
        )
        if self.ok:
            return f"ok: {checked}; nothing stops this deploy"
        return f"{_count(len(self.findings), 'finding')}: {checked}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entities": self.entities,
            "rows": self.rows,
            "messages": self.messages,
            "wakes": self.wakes,
            "findings": [f.to_json() for f in self.findings],
        }


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


Progress = Callable[[int, int], None]  # (done, total) entities


async def _records(rt: Runtime) -> list[EntityRecord]:
    """Every entity record, paged through the side table."""
    found: list[EntityRecord] = []
    after: str | None = None
    while True:
        rows = await rt.store.kv_scan(ENTITY_NS, after=after, limit=_PAGE)
        found.extend(EntityRecord.load(raw) for _key, raw in rows)
        if len(rows) < _PAGE:
            return found
        after = rows[-1][0]


async def check_deploy(
    rt: Runtime, *, replay_last: int = 20, progress: Progress | None = None
) -> CheckReport:
    """Check the data stored in ``rt.store`` against the code of ``rt.registry`` (see the
    module docstring); ``progress(done, total)`` is told as entities are read. Writes nothing.

    Raises whatever the store raises for a failed read.
    """
    report = CheckReport()
    records = await _records(rt)
    missing: dict[str, list[str]] = {}
    for done, record in enumerate(records, start=1):
        if record.status != "stopped":
            report.entities += 1
            if record.type not in rt.registry:
                missing.setdefault(record.type, []).append(record.url)
            else:
                await _check_entity(rt, rt.registry.get(record.type), record, report)
        if progress is not None:
            progress(done, len(records))
    for type_, urls in sorted(missing.items()):
        named = ", ".join(urls[:MAX_NAMED])
        more = f" and {len(urls) - MAX_NAMED} more" if len(urls) > MAX_NAMED else ""
        report.findings.append(
            CheckFinding(
                "missing_type",
                f"type {type_!r} is not in the new code but has "
                f"{_count(len(urls), 'live entity', 'live entities')}: {named}{more}",
                type_,
                tuple(urls),
            )
        )
    if replay_last > 0:
        await _replay_types(rt, records, replay_last, report)
    return report


def _fields(errors: list[Any]) -> list[tuple[str, str]]:
    """``(dotted field path, message)`` of each of pydantic's errors."""
    found = []
    for e in errors:
        loc = ".".join(str(part) for part in e.get("loc", ())) or "(the whole value)"
        found.append((loc, str(e.get("msg", ""))))
    return found


async def _check_entity(
    rt: Runtime, entity_type: EntityType, record: EntityRecord, report: CheckReport
) -> None:
    """Validate the state rows and queued inbox messages of one live entity."""
    if not entity_type.state and entity_type.inbox is None:
        return
    target = parse_url(record.url)
    try:
        loaded = await load_range(rt.store, target, record.acked, None)
    except (StreamNotFound, StreamGone):
        return  # deleted while we looked
    name_of = entity_type.name
    for name, definition in entity_type.state.items():
        for key, row in sorted(loaded.view.get(definition.event_type(name), {}).items()):
            report.rows += 1
            try:
                current = definition.upgrade(name, key, row, url=target.url)
                definition.model.model_validate(stored_row(current))
            except MigrationFailed as exc:
                report.findings.append(
                    CheckFinding("invalid_row", exc.message, name_of, (target.url,), name, key)
                )
            except ValidationError as exc:
                for loc, msg in _fields(exc.errors(include_url=False)):
                    report.findings.append(
                        CheckFinding(
                            "invalid_row",
                            f"{target.url} state {name!r} row {key!r}: field {loc!r} does not "
                            f"fit {definition.model.__name__}: {msg}",
                            name_of,
                            (target.url,),
                            name,
                            key,
                            loc,
                        )
                    )
    if entity_type.inbox is None:
        return
    for event in loaded.events:
        if event["type"] != "inbox":
            continue
        report.messages += 1
        value = event.get("value") or {}
        try:
            entity_type.validate_message(value.get("payload"), value.get("message_type"))
        except SchemaValidationFailed as exc:
            problems = _fields(exc.errors) or [("message_type", exc.message)]
            for loc, msg in problems:
                report.findings.append(
                    CheckFinding(
                        "invalid_message",
                        f"{target.url} queued inbox message {event['key']!r}: field {loc!r} "
                        f"does not fit the new inbox schema: {msg}",
                        name_of,
                        (target.url,),
                        "inbox",
                        event["key"],
                        loc,
                    )
                )


async def _replay_types(
    rt: Runtime, records: list[EntityRecord], last: int, report: CheckReport
) -> None:
    """Replay the ``last`` most recent wakes of each registered type (from its most recently
    active entities) and record each divergence."""
    by_type: dict[str, list[EntityRecord]] = {}
    for record in records:
        if record.type in rt.registry and record.runs > 0:
            by_type.setdefault(record.type, []).append(record)
    for type_, group in sorted(by_type.items()):
        budget = last
        for record in sorted(group, key=lambda r: r.last_active, reverse=True):
            if budget <= 0:
                break
            try:
                replayed = await replay(rt, record.url, last=budget)
            except EntitiesError as exc:
                report.findings.append(
                    CheckFinding(
                        "divergence",
                        f"{record.url}: its wakes cannot be replayed: {exc.message}",
                        type_,
                        (record.url,),
                    )
                )
                continue
            budget -= len(replayed.wakes)
            report.wakes += len(replayed.wakes)
            for wake in replayed.wakes:
                for d in wake.divergences:
                    report.findings.append(
                        CheckFinding(
                            "divergence",
                            f"{record.url} wake {wake.index} ({wake.wake_id}) diverges when "
                            f"replayed: {d.message} (at {d.where})",
                            type_,
                            (record.url,),
                            wake_id=wake.wake_id,
                        )
                    )
