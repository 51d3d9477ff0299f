"""The one encoder of the change events the runtime writes to entity streams.

Every event in an entity's stream is a State Protocol change event (see ``streams``):
``{type, key, value?, old_value?, headers: {operation, txid?, timestamp?}}``, ``type`` naming a
collection. :func:`change` builds one as a dict (what a wake buffers, and what replay and
observers compare), :func:`event` as the bytes stored (:func:`encode` turns the first into the
second). The ``txid`` is the id of the wake that
wrote it, which is how replay finds a wake's writes.
"""

from __future__ import annotations

import functools
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from streams import Operation
from streams import encode_event as encode

__all__ = [
    "JSON",
    "change",
    "encode",
    "event",
    "from_iso",
    "inbox_value",
    "iso",
    "new_token",
]

JSON = "application/json"


@functools.lru_cache(maxsize=4096)
def iso(ts: float) -> str:
    """RFC 3339 UTC timestamp with milliseconds (cached: a commit stamps many events with one
    time)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def from_iso(text: str) -> float:
    """The epoch seconds of an :func:`iso` timestamp: the middle of the millisecond it names,
    so that :func:`iso` of the result gives ``text`` again.

    Raises:
        ValueError: not such a timestamp.
    """
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return parsed.timestamp() + 0.0005


def change(
    type_: str,
    key: str,
    value: Any,
    ts: float | None,
    operation: Operation = "insert",
    *,
    txid: str | None = None,
    old: Any = None,
) -> dict[str, Any]:
    """One change event as a dict (the shape :func:`streams.change` builds), stamped with
    ``ts`` (epoch seconds; ``None``: no timestamp) and, when given, the wake id ``txid``. A
    delete carries no value. Built here directly: it is on every wake's path."""
    headers: dict[str, Any] = {"operation": operation}
    if txid is not None:
        headers["txid"] = txid
    if ts is not None:
        headers["timestamp"] = iso(ts)
    body: dict[str, Any] = {"type": type_, "key": key, "headers": headers}
    if operation != "delete":
        body["value"] = value
    if old is not None:
        body["old_value"] = old
    return body


def event(
    type_: str,
    key: str,
    value: Any,
    ts: float,
    operation: Operation = "insert",
    *,
    txid: str | None = None,
) -> bytes:
    """One change event as the bytes stored in a stream (see :func:`change`)."""
    return orjson.dumps(change(type_, key, value, ts, operation, txid=txid))


def inbox_value(
    payload: Any,
    message_type: str | None,
    sender: str | None,
    now: float,
    trace: dict[str, str] | None = None,
    mode: str | None = None,
    attachments: list[dict[str, Any]] | None = None,
) -> Any:
    """The value of an ``inbox`` event: one message to an entity (with ``trace``, the W3C trace
    context of its sender, when tracing is on; with ``mode``, how it was sent when not
    ``queued``: ``steer`` or ``interrupt``; with ``attachments``, the files it carries)."""
    value = {
        "from": sender,
        "payload": payload,
        "message_type": message_type,
        "timestamp": iso(now),
        "ts": now,
    }
    if trace is not None:
        value["trace"] = trace
    if mode is not None and mode != "queued":
        value["mode"] = mode
    if attachments:
        value["attachments"] = attachments
    return value


def new_token() -> bytes:
    """A fresh pending mark: a wake claimed under an earlier mark cannot clear this one."""
    return uuid.uuid4().hex.encode()
