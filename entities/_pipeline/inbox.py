"""Stage 1, the inbox: anything that should wake an entity is appended to its stream, and the
entity is marked pending, in one transaction (DESIGN §4.1). This module is the one place that
writes that pair of operations; sends from outside, sends committed by a wake, a child's finish,
an observed change, a fired timer and a spawn all go through it.

A pending mark is a random token in the ``pending`` namespace. A claim remembers the mark it
was taken under, and the wake's commit clears the mark only if it is still that one, so a mark
written while the wake ran (more arrived) keeps the entity pending.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson

from streams import Append, Create, KvPut, Op

from .._events import JSON, event, inbox_value, iso, new_token
from .._records import (
    ENTITY_NS,
    PENDING_NS,
    TAG_NS,
    WAKE_TYPES,
    EntityInfo,
    EntityRecord,
    info_of,
)
from .._tracing import carrier
from .._urls import EntityURL

__all__ = ["Deliveries", "created_info", "message_event", "send_ops", "spawn_ops", "wake_ops"]


def wake_ops(target: EntityURL, events: Sequence[bytes], token: bytes | None = None) -> list[Op]:
    """Append ``events`` to ``target``'s stream and mark it pending (with ``token``, else a
    fresh mark)."""
    return [
        Append(target.stream, list(events)),
        KvPut(PENDING_NS, target.url, token if token is not None else new_token()),
    ]


def message_event(
    key: str,
    payload: Any,
    message_type: str | None,
    sender: str | None,
    now: float,
    mode: str | None = None,
    attachments: list[dict[str, Any]] | None = None,
) -> bytes:
    """The ``inbox`` event of one message (carrying the sender's trace context, if any, its
    send mode unless ``queued``, and its attachments, if any)."""
    value = inbox_value(payload, message_type, sender, now, carrier(), mode, attachments)
    return event("inbox", key, value, now)


def send_ops(
    target: EntityURL,
    key: str,
    payload: Any,
    message_type: str | None,
    sender: str | None,
    now: float,
    mode: str | None = None,
    attachments: list[dict[str, Any]] | None = None,
) -> list[Op]:
    """Deliver one (validated) message to ``target``: its inbox event, and the mark."""
    event = message_event(key, payload, message_type, sender, now, mode, attachments)
    return wake_ops(target, [event])


class Deliveries:
    """Wake events for many entities, gathered into one transaction: one append per stream and
    one pending mark per entity, however many events each gets (a timer batch, a wake's sends).
    """

    def __init__(self) -> None:
        self._appends: dict[str, list[bytes]] = {}
        self._marked: dict[str, None] = {}  # entity URLs to mark, in first-seen order

    def wake(self, target: EntityURL, events: Sequence[bytes]) -> None:
        """Append ``events`` to ``target`` and mark it pending."""
        self._appends.setdefault(target.stream, []).extend(events)
        self._marked[target.url] = None

    def append(self, stream: str, events: Sequence[bytes]) -> None:
        """Append ``events`` without waking anyone (a record in the sender's own stream)."""
        self._appends.setdefault(stream, []).extend(events)

    def mark(self, url: str) -> None:
        """Mark ``url`` pending without appending (its events arrive by another operation)."""
        self._marked[url] = None

    def __bool__(self) -> bool:
        return bool(self._appends or self._marked)

    def ops(self, token: bytes | None = None) -> list[Op]:
        """The marks (all with ``token``, else one fresh mark for the transaction), then the
        appends."""
        if not self._marked and not self._appends:
            return []
        mark = token if token is not None or not self._marked else new_token()
        return [
            *(KvPut(PENDING_NS, url, mark) for url in self._marked),
            *(Append(path, messages) for path, messages in self._appends.items()),
        ]


def spawn_ops(
    target: EntityURL,
    args: Mapping[str, Any],
    now: float,
    *,
    tags: Mapping[str, str] | None = None,
    parent: str | None = None,
    initial_message: Any = None,
    initial_message_type: str | None = None,
    message_key: str | None = None,
    sender: str | None = None,
    parent_wake: str | None = None,
) -> list[Op]:
    """The operations that create an entity (args and message validated already): its stream,
    opened with ``entity_created`` (then its tags and initial message), its record (only if
    none exists) and its pending mark, so its first wake (``first_wake``, with ``args``)
    follows. The stream is created exclusively: a second spawn of the URL fails the commit
    with ``StreamExists`` or ``StreamGone``."""
    created = {
        "entity_type": target.type,
        "url": target.url,
        "args": dict(args),
        "parent_url": parent,
        "created_at": iso(now),
    }
    messages = [event("entity_created", "entity", created, now)]
    ops: list[Op] = []
    for name, value in (tags or {}).items():
        messages.append(event("tags", name, {"value": value}, now))
        ops.append(KvPut(TAG_NS, f"{target.url}\n{name}", value.encode()))
    if initial_message is not None:
        key = message_key or new_token().decode()
        sent_by = sender or parent
        messages.append(message_event(key, initial_message, initial_message_type, sent_by, now))
    record = EntityRecord(
        url=target.url,
        type=target.type,
        id=target.id,
        parent=parent,
        parent_wake="run_finished" if parent and parent_wake == "run_finished" else None,
        created_at=now,
        last_active=now,
    )
    return [
        Create(target.stream, content_type=JSON, messages=messages, exclusive=True),
        KvPut(ENTITY_NS, target.url, record.dump(), only_if=True, expect=None),
        *ops,
        KvPut(PENDING_NS, target.url, new_token()),
    ]


def created_info(ops: Sequence[Op]) -> EntityInfo:
    """The entity the commit of ``ops`` (made by :func:`spawn_ops`) created, as a lookup
    before its first wake reads it: idle and pending, with its tags and the wake events it
    starts with (a spawn answers with this, not with a read that may already see its first
    wake running)."""
    record: EntityRecord | None = None
    tags: dict[str, str] = {}
    queue = 0
    for op in ops:
        if isinstance(op, Create):
            queue = sum(1 for m in op.messages if orjson.loads(m).get("type") in WAKE_TYPES)
        elif isinstance(op, KvPut) and op.value is not None:
            if op.namespace == ENTITY_NS:
                record = EntityRecord.load(op.value)
            elif op.namespace == TAG_NS:
                tags[op.key.split("\n", 1)[1]] = op.value.decode()
    if record is None:
        raise ValueError("not the operations of a spawn")
    return replace(info_of(record, True, tags), queue=queue)
