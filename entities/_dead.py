"""Dead letters: wakes given up after their last attempt, listed, retried or discarded.

A dead-lettered wake is recorded (its run ``dead_lettered``, its errors) and acknowledged, so the
entity goes on with its next messages; its row in the ``dead`` namespace (a
:class:`~entities.DeadLetter`) stays until someone decides. Retrying appends the wake's events
(its messages, and other wake events such as a child's finish) to the entity's stream again,
marked ``redelivered`` with the dead letter's id, and marks the entity pending, all in one
transaction that also removes the row: so a retry happens once, however often it is asked for.
"""

from __future__ import annotations

from typing import Any

import orjson

from streams import KvCheck, KvPut, Op, Store

from ._errors import DeadLetterNotFound
from ._events import encode
from ._pipeline.inbox import wake_ops
from ._pipeline.load import messages_between
from ._records import DEAD_NS, WAKE_TYPES, DeadLetter
from ._replies import unstatus_ops
from ._urls import parse_url

__all__ = ["dead_letters", "discard_ops", "find", "retry_ops"]


async def dead_letters(
    store: Store, *, type: str | None = None, url: str | None = None
) -> list[DeadLetter]:
    """The dead letters of one entity (``url``), one type, or all, oldest first.

    Raises whatever the store raises.
    """
    prefix = f"{url}|" if url else f"/{type}/" if type else ""
    rows = await store.kv_scan(DEAD_NS, prefix)
    found = [DeadLetter.model_validate_json(raw) for _key, raw in rows]
    return sorted(found, key=lambda letter: (letter.at, letter.key))


async def find(store: Store, id: str) -> tuple[DeadLetter, bytes]:
    """The dead letter ``id`` and its stored bytes.

    Raises:
        DeadLetterNotFound: no such dead letter (retried or discarded already, or never).
    """
    key = DeadLetter.key_of(id)
    raw = None if key is None else await store.kv_get(DEAD_NS, key)
    if raw is None:
        raise DeadLetterNotFound(f"no dead letter {id!r}")
    letter = DeadLetter.model_validate_json(raw)
    return letter, raw


async def retry_ops(store: Store, letter: DeadLetter, raw: bytes) -> list[Op]:
    """The transaction that redelivers ``letter``'s wake events as a new wake and removes the
    row (checked: it commits once). Reads only the letter's own range of the stream.

    Raises whatever the store raises (``StreamNotFound`` when the entity is gone).
    """
    target = parse_url(letter.url)
    events: list[bytes] = []
    keys: list[str] = []  # its messages' keys: their dead_lettered status goes
    async for message in messages_between(
        store, target.stream, letter.from_offset, letter.to_offset
    ):
        item = orjson.loads(message.data)
        if item.get("type") in WAKE_TYPES and item.get("type") != "entity_created":
            if item["type"] == "inbox":
                keys.append(item["key"])
            events.append(encode(_redelivered(item, letter.id)))
    ops: list[Op] = [KvCheck(DEAD_NS, letter.key, raw), KvPut(DEAD_NS, letter.key, None)]
    if events:
        ops.extend(wake_ops(target, events))
    ops.extend(unstatus_ops(target.url, keys))
    return ops


def _redelivered(item: dict[str, Any], id: str) -> dict[str, Any]:
    """A wake event as delivered again: the same key and payload, marked with the letter."""
    value = item.get("value")
    if isinstance(value, dict):
        item["value"] = {**value, "redelivered": id}
    item.pop("offset", None)
    return item


def discard_ops(letter: DeadLetter, raw: bytes) -> list[Op]:
    """The transaction that drops ``letter`` for good (checked: it commits once)."""
    return [KvCheck(DEAD_NS, letter.key, raw), KvPut(DEAD_NS, letter.key, None)]
