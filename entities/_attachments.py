"""Attachments: files a message carries by reference (``attachments`` next to ``payload``).

Each attachment is an object ``{"type", "name", "mime", "url" | "stream"}``:

* ``type``: ``image``, ``file``, ``audio`` or ``video``;
* ``url``: where it is (``http:``, ``https:`` or a ``data:`` URL), **or** ``stream``: the path
  of a stream on the same store (``/uploads/report.pdf``; its messages' bytes, in order, are the
  content; upload it with the streams protocol first);
* ``name`` (optional): a file name; by default the last segment of the URL or stream path;
* ``mime`` (optional): a media type (``image/png``); by default the ``data:`` URL's, else
  guessed from the name.

They are validated when the message is sent (a bad one is a ``422``), kept on the inbox row
(``attachments``) and handed to the entity as :attr:`InboxMessage.attachments`: agents send
them to models that accept images or files (see ``entities.agent``), subprocess agents get
them in ``AGENT_ATTACHMENTS``. Nothing is fetched or copied when the message is sent.
"""

from __future__ import annotations

import mimetypes
import re
from typing import Any

from ._errors import SchemaValidationFailed

__all__ = ["ATTACHMENT_TYPES", "MAX_ATTACHMENTS", "check_attachments"]

ATTACHMENT_TYPES = ("image", "file", "audio", "video")
MAX_ATTACHMENTS = 20
_MAX_URL = 64 * 1024 * 1024  # a data: URL is the content itself
_MIME = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*")
_DATA = re.compile(r"data:([^;,]*)(;[^,]*)?,", re.ASCII)
_KEYS = {"type", "name", "mime", "url", "stream"}


def _bad(message: str, at: int | None = None) -> SchemaValidationFailed:
    loc: list[Any] = ["attachments"] if at is None else ["attachments", at]
    return SchemaValidationFailed(
        f"attachments: {message}", [{"loc": loc, "msg": message, "type": "value_error"}]
    )


def check_attachments(value: Any) -> list[dict[str, Any]]:
    """The attachments of a send, validated and completed (``name`` and ``mime`` filled in);
    ``[]`` for ``None``.

    Raises:
        SchemaValidationFailed: not a list of at most :data:`MAX_ATTACHMENTS` objects, or an
            object with an unknown key or type, both or neither of ``url`` and ``stream``, a
            URL that is not ``http(s):`` or ``data:``, a stream path not starting with ``/``,
            or a malformed ``mime``.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("must be a list of objects")
    if len(value) > MAX_ATTACHMENTS:
        raise _bad(f"at most {MAX_ATTACHMENTS} per message, got {len(value)}")
    return [_check_one(item, at) for at, item in enumerate(value)]


def _check_one(item: Any, at: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise _bad("each attachment is an object {type, name, mime, url | stream}", at)
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(unknown)}", at)
    kind = item.get("type")
    if kind not in ATTACHMENT_TYPES:
        raise _bad(f"type must be one of {', '.join(ATTACHMENT_TYPES)}, not {kind!r}", at)
    url, stream = item.get("url"), item.get("stream")
    if (url is None) == (stream is None):
        raise _bad("give exactly one of url and stream", at)
    mime = item.get("mime")
    if mime is not None and (not isinstance(mime, str) or not _MIME.fullmatch(mime)):
        raise _bad(f"mime must look like type/subtype, not {mime!r}", at)
    name = item.get("name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 255):
        raise _bad("name must be a string of 1 to 255 characters", at)
    out: dict[str, Any] = {"type": kind}
    if url is not None:
        if not isinstance(url, str) or len(url) > _MAX_URL:
            raise _bad("url must be a string", at)
        data = _DATA.match(url)
        if data is not None:
            mime = mime or data.group(1) or None
        elif not url.startswith(("http://", "https://")):
            raise _bad(f"url must be http(s): or data:, not {url[:40]!r}", at)
        out["url"] = url
        where = "" if data is not None else url.split("?", 1)[0].split("#", 1)[0]
    else:
        if not isinstance(stream, str) or not stream.startswith("/") or len(stream) > 1024:
            raise _bad(f"stream must be a stream path starting with /, not {stream!r}", at)
        out["stream"] = stream
        where = stream
    name = name or where.rstrip("/").rsplit("/", 1)[-1] or kind
    out["name"] = name
    out["mime"] = mime or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return out
