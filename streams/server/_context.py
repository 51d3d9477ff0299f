"""What every handler needs: the store, the settings, shared live reads, request helpers."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .. import Store, is_json_content_type
from ._fanout import Fanout
from ._protocol import Problem
from ._settings import ServerSettings
from ._subscriptions import Subscriptions

__all__ = ["Context", "etag", "reply", "sse_encoding"]

logger = logging.getLogger("streams.server")


@dataclass(slots=True)
class Context:
    store: Store
    settings: ServerSettings
    fanout: Fanout
    subscriptions: Subscriptions

    def stream_path(self, request: Request) -> str:
        """The stream path of a request, validated (``{base_path}/{path}``)."""
        path = str(request.path_params.get("path", ""))
        return self.validate_path(path)

    def validate_path(self, path: str) -> str:
        if not path:
            raise Problem(400, "BAD_PATH", "the stream path is empty")
        if len(path) > self.settings.max_path_length:
            raise Problem(400, "BAD_PATH", "the stream path is too long")
        if any(ch < " " or ch == "\x7f" for ch in path):
            raise Problem(400, "BAD_PATH", "the stream path contains control characters")
        segments = path.split("/")
        if any(segment in ("", ".", "..") for segment in segments):
            raise Problem(400, "BAD_PATH", "the stream path has an empty, '.' or '..' segment")
        if segments[0] == "__ds":
            raise Problem(404, "NOT_FOUND", "paths under __ds/ are reserved")
        return path

    async def body(self, request: Request) -> bytes:
        """The request body, refusing (413) anything over ``max_body_bytes``.

        Raises:
            Problem: ``413`` for a body over the limit; ``400`` for one that ended early or
                was badly framed (a malformed chunked encoding: uvicorn has already
                answered it and logged one line).
        """
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Problem(400, "BAD_REQUEST", "Content-Length is malformed")
            if int(declared) > limit:
                raise Problem(413, "PAYLOAD_TOO_LARGE", f"the body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Problem(413, "PAYLOAD_TOO_LARGE", f"the body exceeds {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            client = request.client.host if request.client is not None else "?"
            logger.debug(  # uvicorn logs a badly framed one (in one line); nothing more here
                "%s %s from %s: the body was cut short or badly framed; nothing was done",
                request.method,
                request.url.path,
                client,
            )
            raise Problem(400, "BAD_REQUEST", "the request body ended early") from None
        return b"".join(chunks)


def reply(status: int, headers: Mapping[str, str], body: bytes = b"") -> Response:
    """A response with exactly these headers (no charset added to the content type)."""
    return Response(content=body, status_code=status, headers=dict(headers))


def etag(path: str, created_at: float, start: str, end: str, closed: bool) -> str:
    """A strong validator for one catch-up read; it changes when the stream closes."""
    digest = hashlib.blake2b(
        f"{path}\0{created_at!r}\0{start}\0{end}\0{int(closed)}".encode(), digest_size=12
    ).hexdigest()
    return f'"{digest}{":c" if closed else ""}"'


def sse_encoding(content_type: str) -> str:
    """How SSE data events carry this stream: ``json``, ``text`` or ``base64``."""
    if is_json_content_type(content_type):
        return "json"
    if content_type.split(";", 1)[0].strip().lower().startswith("text/"):
        return "text"
    return "base64"
