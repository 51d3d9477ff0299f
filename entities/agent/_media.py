"""Message attachments as the model providers take them (images and files by URL or inline).

An attachment reaching an adapter is ``{type, name, mime, url}``: the agent loop has already
turned a ``stream`` reference into a ``data:`` URL (see ``Agent``). Each adapter maps what its
API accepts (Anthropic: images and PDF/text documents; OpenAI Chat Completions: images, PDF
files inline, wav/mp3 audio inline) and mentions anything else in a text part
(:func:`mention`), so the model at least knows it was sent.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Mapping
from typing import Any

__all__ = ["DataURL", "data_url", "mention", "parse_data_url"]


class DataURL:
    """A parsed ``data:`` URL: its media type and its bytes (as base64)."""

    __slots__ = ("base64", "mime")

    def __init__(self, mime: str, b64: str) -> None:
        self.mime = mime
        self.base64 = b64

    def text(self) -> str:
        """The content decoded as UTF-8 (replacing what is not)."""
        return base64.b64decode(self.base64).decode("utf-8", "replace")

    def url(self) -> str:
        return f"data:{self.mime};base64,{self.base64}"


def parse_data_url(url: str, fallback_mime: str = "application/octet-stream") -> DataURL | None:
    """The parts of a ``data:`` URL, or ``None`` for another URL or a malformed one."""
    if not url.startswith("data:") or "," not in url:
        return None
    head, _, body = url[5:].partition(",")
    params = head.split(";")
    mime = params[0] or fallback_mime
    if "base64" in params[1:]:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return None
        return DataURL(mime, body)
    raw = urllib.parse.unquote_to_bytes(body)
    return DataURL(mime, base64.b64encode(raw).decode())


def data_url(mime: str, content: bytes) -> str:
    """``content`` as a base64 ``data:`` URL."""
    return f"data:{mime};base64,{base64.b64encode(content).decode()}"


def mention(attachment: Mapping[str, Any], why: str = "") -> str:
    """A text line telling the model about an attachment it is not given as content."""
    url = str(attachment.get("url") or "")
    where = "" if url.startswith("data:") or not url else f" at {url}"
    name, mime, kind = attachment.get("name"), attachment.get("mime"), attachment.get("type")
    reason = f" ({why})" if why else ""
    return f"[attached {kind} {name!r}, {mime}{where}{reason}]"
