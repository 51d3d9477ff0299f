"""HEAD, catch-up GET and ``live=long-poll``."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from .. import ReadResult, StreamInfo, is_json_content_type, join_json
from ._context import Context, etag, reply
from ._protocol import (
    CLOSED,
    CURSOR,
    NEXT_OFFSET,
    UP_TO_DATE,
    Problem,
    format_expires_at,
    next_cursor,
    parse_cursor,
    parse_offset_value,
)
from ._sse import handle_sse

__all__ = ["handle_get", "handle_head"]


async def handle_head(ctx: Context, request: Request) -> Response:
    info = await ctx.store.head(ctx.stream_path(request))
    out = {
        "Content-Type": info.content_type,
        NEXT_OFFSET: info.next_offset,
        "Cache-Control": "no-store",
    }
    if info.closed:
        out[CLOSED] = "true"
    if info.ttl_seconds is not None:
        out["Stream-TTL"] = str(info.ttl_seconds)
    if info.expires_at is not None:
        out["Stream-Expires-At"] = format_expires_at(info.expires_at)
    return reply(200, out)


def _single(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise Problem(400, "BAD_REQUEST", f"give the {name!r} parameter at most once")
    return values[0] if values else None


async def handle_get(ctx: Context, request: Request) -> Response:
    path = ctx.stream_path(request)
    raw_offset = _single(request, "offset")
    offset = None if raw_offset is None else parse_offset_value(raw_offset)
    live = _single(request, "live")
    cursor = parse_cursor(_single(request, "cursor"))
    if live is not None and live not in ("long-poll", "sse"):
        raise Problem(400, "BAD_REQUEST", f"live must be 'long-poll' or 'sse', not {live[:40]!r}")
    if live is not None and offset is None:
        raise Problem(400, "BAD_REQUEST", f"live={live} needs an offset parameter")
    if live == "sse":
        assert offset is not None
        return await handle_sse(ctx, path, offset, cursor)
    info = await ctx.store.head(path)
    first = await ctx.store.read(
        path,
        offset or "-1",
        limit=ctx.settings.read_max_messages,
        max_bytes=ctx.settings.read_max_bytes,
    )
    if live is None:
        return _data_response(ctx, request, info, offset or "-1", first, cursor=None)
    assert offset is not None
    return await _long_poll(ctx, request, info, offset, first, cursor)


def _data_response(
    ctx: Context,
    request: Request,
    info: StreamInfo,
    offset: str,
    result: ReadResult,
    cursor: int | None,
    *,
    live: bool = False,
) -> Response:
    datas = [message.data for message in result.messages]
    body = join_json(datas) if is_json_content_type(info.content_type) else b"".join(datas)
    out = {"Content-Type": info.content_type, NEXT_OFFSET: result.next_offset}
    if result.up_to_date:
        out[UP_TO_DATE] = "true"
    if result.closed:
        out[CLOSED] = "true"
    if live and not result.closed:
        out[CURSOR] = next_cursor(cursor)
    if offset == "now":
        out["Cache-Control"] = "no-store"
        return reply(200, out, body)
    tag = etag(info.path, info.created_at, offset, result.next_offset, result.closed)
    out["ETag"] = tag
    if result.up_to_date and not result.closed:
        out["Cache-Control"] = "no-cache"  # the tail moves: revalidate (cheap 304s)
    else:
        age = ctx.settings.cache_max_age_s
        out["Cache-Control"] = f"public, max-age={age}, stale-while-revalidate={age * 5}"
    match = request.headers.get("if-none-match")
    if match is not None and tag in (part.strip() for part in match.split(",")):
        return reply(304, out)
    return reply(200, out, body)


def _empty_response(result: ReadResult, cursor: int | None) -> Response:
    out = {NEXT_OFFSET: result.next_offset, UP_TO_DATE: "true", "Cache-Control": "no-store"}
    if result.closed:
        out[CLOSED] = "true"
    else:
        out[CURSOR] = next_cursor(cursor)
    return reply(204, out)


async def _long_poll(
    ctx: Context,
    request: Request,
    info: StreamInfo,
    offset: str,
    result: ReadResult,
    cursor: int | None,
) -> Response:
    """Answer at once when data (or the close) is there, else wait on the store for it."""
    if result.messages:
        return _data_response(ctx, request, info, offset, result, cursor, live=True)
    if result.closed:
        return _empty_response(result, cursor)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.settings.long_poll_timeout_s
    position = result.next_offset
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return _empty_response(result, cursor)
        change = await ctx.fanout.next(info.path, position, remaining)
        if change is None:
            continue
        result = change[0]
        if result.messages:
            return _data_response(ctx, request, info, position, result, cursor, live=True)
        if result.closed:
            return _empty_response(result, cursor)
