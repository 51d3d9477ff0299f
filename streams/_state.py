"""The State Protocol: change events over JSON streams, and their materialisation.

A change event is ``{"type", "key", "value"?, "old_value"?, "headers": {"operation", "txid"?,
"timestamp"?}}`` with ``operation`` one of ``insert``, ``update``, ``delete``. A control message is
``{"headers": {"control": "snapshot-start" | "snapshot-end" | "reset", "offset"?}}``.

:class:`Materializer` folds events into collections (``type`` -> ``key`` -> ``value``; insert and
update upsert, delete removes, ``reset`` clears). :func:`materialize` rebuilds a stream's view from
the latest saved snapshot plus the tail after it, so the cost of a rebuild does not grow with the
stream's whole history; :func:`save_snapshot` records one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import orjson

from ._backends.base import Store
from ._errors import InvalidRequest
from ._offsets import START

__all__ = [
    "SNAPSHOT_NAMESPACE",
    "Materializer",
    "Operation",
    "change",
    "control",
    "decode_event",
    "encode_event",
    "materialize",
    "save_snapshot",
]

Operation = Literal["insert", "update", "delete"]
_OPERATIONS = frozenset({"insert", "update", "delete"})
_CONTROLS = frozenset({"snapshot-start", "snapshot-end", "reset"})
SNAPSHOT_NAMESPACE = "state-snapshot"
_SNAPSHOT_VERSION = 1


def change(
    type: str,
    key: str,
    value: Any = None,
    *,
    operation: Operation = "insert",
    old_value: Any = None,
    txid: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """Build a change event (a plain dict, ready for :func:`encode_event`)."""
    headers: dict[str, Any] = {"operation": operation}
    if txid is not None:
        headers["txid"] = txid
    if timestamp is not None:
        headers["timestamp"] = timestamp
    event: dict[str, Any] = {"type": type, "key": key, "headers": headers}
    if operation != "delete" or value is not None:
        event["value"] = value
    if old_value is not None:
        event["old_value"] = old_value
    return event


def control(
    kind: Literal["snapshot-start", "snapshot-end", "reset"], offset: str | None = None
) -> dict[str, Any]:
    """Build a control message."""
    headers: dict[str, Any] = {"control": kind}
    if offset is not None:
        headers["offset"] = offset
    return {"headers": headers}


def encode_event(event: Mapping[str, Any]) -> bytes:
    """Serialise an event to the bytes stored in a stream."""
    return orjson.dumps(event)


def decode_event(data: bytes | str) -> dict[str, Any]:
    """Parse and check one stored event.

    Raises:
        InvalidRequest: not JSON, or not a well-formed change or control message.
    """
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"state event is not JSON: {exc}") from None
    _check(event)
    return event  # type: ignore[no-any-return]


def _check(event: Any) -> None:
    if not isinstance(event, dict):
        raise InvalidRequest("state event must be a JSON object")
    headers = event.get("headers")
    if not isinstance(headers, dict):
        raise InvalidRequest("state event needs a headers object")
    if "control" in headers:
        if headers["control"] not in _CONTROLS:
            raise InvalidRequest(f"unknown control {headers['control']!r}")
        return
    if headers.get("operation") not in _OPERATIONS:
        raise InvalidRequest("headers.operation must be insert, update or delete")
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise InvalidRequest("type must be a non-empty string")
    if not isinstance(event.get("key"), str) or not event["key"]:
        raise InvalidRequest("key must be a non-empty string")
    if headers["operation"] != "delete" and "value" not in event:
        raise InvalidRequest("insert and update need a value")


class Materializer:
    """Collections folded from State Protocol events, with the offset they reflect."""

    def __init__(
        self,
        collections: dict[str, dict[str, Any]] | None = None,
        offset: str = START,
        *,
        types: Iterable[str] | None = None,
        prefixes: Iterable[str] = (),
    ) -> None:
        """``types`` limits what is folded to those collection names and the names starting
        with one of ``prefixes``; ``None`` keeps every collection."""
        self.collections: dict[str, dict[str, Any]] = collections if collections is not None else {}
        self.offset = offset
        self.types = None if types is None else frozenset(types)
        self.prefixes = tuple(prefixes)
        self.applied = 0

    def apply(self, event: Mapping[str, Any]) -> None:
        """Fold one decoded event (unchecked: use :func:`decode_event` for untrusted input)."""
        headers = event["headers"]
        operation = headers.get("operation")
        if operation is None:
            if headers.get("control") == "reset":
                self.collections.clear()
            return
        type_ = event["type"]
        if self.types is not None and type_ not in self.types:
            if not (self.prefixes and type_.startswith(self.prefixes)):
                return
        if operation == "delete":
            table = self.collections.get(type_)
            if table is not None:
                table.pop(event["key"], None)
        else:
            table = self.collections.get(type_)
            if table is None:
                table = self.collections[type_] = {}
            table[event["key"]] = event["value"]
        self.applied += 1

    def apply_bytes(self, data: bytes) -> None:
        """Decode and fold one stored message."""
        self.apply(orjson.loads(data))

    def get(self, type: str, key: str) -> Any:
        """The value at ``(type, key)``, or ``None``."""
        return self.collections.get(type, {}).get(key)

    def collection(self, type: str) -> dict[str, Any]:
        """All rows of one collection (``key -> value``); empty if none."""
        return self.collections.get(type, {})

    def snapshot(self) -> bytes:
        """Serialise the state and its offset."""
        return orjson.dumps(
            {"v": _SNAPSHOT_VERSION, "offset": self.offset, "collections": self.collections}
        )

    @classmethod
    def from_snapshot(
        cls, data: bytes, *, types: Iterable[str] | None = None, prefixes: Iterable[str] = ()
    ) -> Materializer:
        """Rebuild from :meth:`snapshot` output.

        Raises:
            InvalidRequest: the snapshot has an unknown version.
        """
        raw = orjson.loads(data)
        if raw.get("v") != _SNAPSHOT_VERSION:
            raise InvalidRequest(f"unknown snapshot version {raw.get('v')!r}")
        return cls(raw["collections"], raw["offset"], types=types, prefixes=prefixes)


async def materialize(
    store: Store,
    path: str,
    *,
    use_snapshot: bool = True,
    until: str | None = None,
    batch: int = 10_000,
) -> Materializer:
    """Fold a stream into collections, starting from its latest snapshot when there is one.

    ``until`` stops at that offset (inclusive of the message ending there), for rebuilding the
    state as it was before a given point.

    Raises:
        StreamNotFound, StreamGone: no such stream.
    """
    view = Materializer()
    if use_snapshot:
        saved = await store.kv_get(SNAPSHOT_NAMESPACE, path)
        if saved is not None:
            candidate = Materializer.from_snapshot(saved)
            if until is None or candidate.offset <= until:
                view = candidate
    apply, loads = view.apply, orjson.loads
    while True:
        result = await store.read(path, view.offset, limit=batch, renew_ttl=False)
        messages = result.messages
        done = result.up_to_date or not messages
        if until is not None and messages and messages[-1].offset > until:
            messages = [m for m in messages if m.offset <= until]
            done = True
        for message in messages:
            apply(loads(message.data))
        if messages:
            view.offset = messages[-1].offset
        if done:
            return view


async def save_snapshot(store: Store, path: str, view: Materializer) -> None:
    """Record ``view`` as the snapshot :func:`materialize` starts from next time."""
    await store.kv_put(SNAPSHOT_NAMESPACE, path, view.snapshot())
