"""Idempotent ingress: a send or spawn carrying an idempotency key is applied at most once within
the retention window (a day by default, as Restate keeps them); the same key again gets the
first answer and changes nothing.

Each key has a row in the ``idempotency`` namespace (slot ``{op}\\n{url}\\n{key}``), written in
the same transaction as the send or spawn it guards, after a check that the slot is still empty
(or holds an expired row): two requests racing with one key cannot both commit. The row holds a
fingerprint of the request (the same key with another request is refused) and, once the answer
is known (a send's offset comes from its commit), the answer itself. A process killed between
the commit and writing the answer leaves enough in the row to rebuild it: the message key and a
stream offset before it, from which the message is found again in a short read.

Rows carry their expiry; an index row per expiry (namespace ``idempotency_expiry``, keyed by
time) lets :func:`prune` remove them in due order.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from streams import ConditionFailed, KvCheck, KvPut, Op, Store

from ._errors import IdempotencyKeyReused, InvalidIdempotencyKey

__all__ = [
    "EXPIRY_NS",
    "IDEMPOTENCY_NS",
    "RETENTION_SECONDS",
    "Remembered",
    "check_key",
    "fingerprint",
    "prune",
    "recall",
    "remember_ops",
    "slot_of",
    "store_answer",
]

logger = logging.getLogger("entities")

IDEMPOTENCY_NS = "idempotency"
EXPIRY_NS = "idempotency_expiry"
RETENTION_SECONDS = 24 * 3600.0
MAX_KEY_LENGTH = 256


class Remembered(BaseModel):
    """What an idempotency key remembers of the request it first came with."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["idempotency"] = "idempotency"
    v: int = 1
    op: Literal["send", "spawn"]
    url: str
    fingerprint: str
    expires: float
    answer: dict[str, Any] | None = None  # set once known
    message_key: str | None = None  # a send's message, to rebuild a lost answer
    after: str | None = None  # a stream offset before that message

    def dump(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid idempotency key: 1 to 256 printable ASCII characters.

    Raises:
        InvalidIdempotencyKey: it is not.
    """
    if not 0 < len(key) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        raise InvalidIdempotencyKey(
            f"idempotency keys are 1 to {MAX_KEY_LENGTH} printable ASCII characters"
        )
    return key


def slot_of(op: str, url: str, key: str) -> str:
    """The row of key ``key`` for ``op`` on ``url`` (keys are scoped per operation and entity)."""
    return f"{op}\n{url}\n{key}"


def fingerprint(*parts: Any) -> str:
    """A digest of a request's content (what must match when its key comes again)."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def recall(
    store: Store, slot: str, fingerprint: str, now: float
) -> tuple[Remembered | None, bytes | None]:
    """The live row of ``slot`` (``None`` when empty or expired) and the bytes stored there (to
    check against when claiming the slot).

    Raises:
        IdempotencyKeyReused: the key was first used with another request.
    """
    raw = await store.kv_get(IDEMPOTENCY_NS, slot)
    if raw is None:
        return None, None
    found = Remembered.model_validate_json(raw)
    if found.expires <= now:
        return None, raw
    if found.fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "this idempotency key was used with another request; use a new key",
            url=found.url,
        )
    return found, raw


def remember_ops(slot: str, record: Remembered, current: bytes | None) -> list[Op]:
    """Claim ``slot`` for ``record``: checked against what :func:`recall` read there (an
    empty or expired row), so one of two racing requests fails with ``ConditionFailed``."""
    index = f"{record.expires:017.6f}|{slot}"
    return [
        KvCheck(IDEMPOTENCY_NS, slot, current),
        KvPut(IDEMPOTENCY_NS, slot, record.dump()),
        KvPut(EXPIRY_NS, index, b""),
    ]


async def store_answer(store: Store, slot: str, record: Remembered, answer: dict[str, Any]) -> None:
    """Write the answer into the row (best effort: a lost answer is rebuilt when asked for)."""
    done = record.model_copy(update={"answer": answer})
    try:
        await store.commit([KvPut(IDEMPOTENCY_NS, slot, done.dump())])
    except Exception as exc:
        logger.warning("could not record the answer of an idempotent request: %r", exc)


async def prune(store: Store, now: float, *, limit: int = 500) -> int:
    """Remove up to ``limit`` rows that expired by ``now``; return how many.

    Raises whatever the store raises.
    """
    due = await store.kv_scan(EXPIRY_NS, "", end=f"{now:017.6f}|~", limit=limit)
    removed = 0
    for index, _empty in due:
        slot = index.split("|", 1)[1]
        raw = await store.kv_get(IDEMPOTENCY_NS, slot)
        ops: list[Op] = [KvPut(EXPIRY_NS, index, None)]
        if raw is not None and Remembered.model_validate_json(raw).expires <= now:
            ops.append(KvPut(IDEMPOTENCY_NS, slot, None, only_if=True, expect=raw))
            removed += 1
        try:
            await store.commit(ops)
        except ConditionFailed:  # renewed meanwhile: the next prune looks again
            continue
    return removed
