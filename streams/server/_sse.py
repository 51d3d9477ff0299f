"""``live=sse``: catch-up then live tail as Server-Sent Events.

Every ``event: data`` is followed by an ``event: control`` carrying ``streamNextOffset`` (and
``streamCursor`` while open, ``upToDate`` when caught up, ``streamClosed`` at the end, after which
the server closes the connection). One data event carries one read's worth of messages: a JSON
array for JSON streams, the text for ``text/*`` streams, base64 for everything else. Payload line
breaks become separate ``data:`` lines, so a payload can never forge an event boundary.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import AsyncIterator

import orjson
from starlette.responses import Response, StreamingResponse

from .. import OffsetGone, ReadResult, StreamGone, StreamNotFound, join_json
from ._context import Context, sse_encoding
from ._protocol import next_cursor

__all__ = ["handle_sse"]

logger = logging.getLogger("streams.server")

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_KEEPALIVE = b": keepalive\n\n"


def data_event(result: ReadResult, encoding: str) -> bytes:
    """The ``event: data`` block for a read's messages."""
    datas = [message.data for message in result.messages]
    if encoding == "json":
        text = join_json(datas).decode()
    elif encoding == "text":
        text = b"".join(datas).decode("utf-8", errors="replace")
    else:
        text = base64.b64encode(b"".join(datas)).decode("ascii")
    lines = [
        ("data: " if line.startswith(" ") else "data:") + line + "\n"
        for line in _LINE_BREAK.split(text)
    ]
    return ("event: data\n" + "".join(lines) + "\n").encode()


def control_event(result: ReadResult, cursor: int | None) -> bytes:
    """The ``event: control`` block that follows every data event (and opens a live tail)."""
    control: dict[str, object] = {"streamNextOffset": result.next_offset}
    if result.closed:
        control["streamClosed"] = True
    else:
        control["streamCursor"] = next_cursor(cursor)
    if result.up_to_date:
        control["upToDate"] = True
    return b"event: control\ndata:" + orjson.dumps(control) + b"\n\n"


async def handle_sse(ctx: Context, path: str, offset: str, cursor: int | None) -> Response:
    info = await ctx.store.head(path)
    first = await ctx.store.read(
        path, offset, limit=ctx.settings.read_max_messages, max_bytes=ctx.settings.read_max_bytes
    )
    encoding = sse_encoding(info.content_type)
    headers = {
        "Cache-Control": "no-cache",
        "Content-Type": "text/event-stream",
        "X-Accel-Buffering": "no",
    }
    if encoding == "base64":
        headers["Stream-SSE-Data-Encoding"] = "base64"
    return StreamingResponse(_events(ctx, path, first, encoding, cursor), headers=headers)


async def _events(
    ctx: Context, path: str, result: ReadResult, encoding: str, cursor: int | None
) -> AsyncIterator[bytes]:
    settings = ctx.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.sse_max_duration_s
    memo: dict[str, object] = {}
    opened = False
    try:
        while True:
            if result.messages:
                # Subscribers of one shared read send the same bytes: encode them once.
                key = f"sse:{cursor}"
                event = memo.get(key)
                if not isinstance(event, bytes):
                    event = data_event(result, encoding) + control_event(result, cursor)
                    memo[key] = event
                yield event
                opened = True
            elif not opened or result.closed:
                yield control_event(result, cursor)
                opened = True
            if result.closed:
                return
            position = result.next_offset
            if not result.up_to_date:
                result, memo = await ctx.fanout.read(path, position)
                continue
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                change = await ctx.fanout.next(
                    path, position, min(remaining, settings.sse_keepalive_s)
                )
                if change is not None:
                    result, memo = change
                    break
                if deadline - loop.time() > 0:
                    yield _KEEPALIVE
    except (StreamNotFound, StreamGone, OffsetGone):
        return  # deleted, expired or truncated past us while we tailed it: end the stream
    except Exception:
        logger.exception("SSE stream of %r failed", path)
