"""JSON-mode helpers: ``application/json`` streams store one message per JSON value."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from ._errors import InvalidRequest

__all__ = ["is_json_content_type", "join_json", "split_json"]


def is_json_content_type(content_type: str) -> bool:
    """Whether a content type selects JSON mode (``application/json``, any parameters)."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def split_json(body: bytes, *, path: str = "", allow_empty: bool = False) -> list[bytes]:
    """Split an appended JSON body into messages: an array is flattened one level.

    ``[a, b]`` gives two messages, ``[[1, 2]]`` one (``[1, 2]``), any other value one.

    Raises:
        InvalidRequest: the body is not valid JSON, or is ``[]`` while ``allow_empty`` is false.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}", path=path) from None
    if isinstance(value, list):
        if not value and not allow_empty:
            raise InvalidRequest("an empty JSON array appends nothing", path=path)
        return [orjson.dumps(item) for item in value]
    return [orjson.dumps(value)]


def join_json(messages: Sequence[bytes]) -> bytes:
    """Join stored JSON messages into one JSON array (what a JSON-mode GET returns)."""
    return b"[" + b",".join(messages) + b"]"
