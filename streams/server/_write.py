"""PUT (create, fork), POST (append, close) and DELETE."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from starlette.requests import Request
from starlette.responses import Response

from .. import (
    DEFAULT_CONTENT_TYPE,
    Append,
    AppendResult,
    Create,
    CreateResult,
    StreamGone,
    StreamNotFound,
    format_offset,
    is_json_content_type,
    parse_offset,
    split_json,
)
from ._context import Context, reply
from ._protocol import (
    CLOSED,
    NEXT_OFFSET,
    Problem,
    parse_closed,
    parse_content_type,
    parse_expires_at,
    parse_offset_value,
    parse_producer,
    parse_stream_seq,
    parse_sub_offset,
    parse_ttl,
)

__all__ = ["handle_delete", "handle_post", "handle_put"]


def _messages(body: bytes, content_type: str, *, path: str, creating: bool) -> list[bytes]:
    if not body:
        return []
    if is_json_content_type(content_type):
        return split_json(body, path=path, allow_empty=creating)
    return [body]


def _source_path(ctx: Context, raw: str) -> str:
    """The store path a ``Stream-Forked-From`` value names (a URL, a URL path or a path)."""
    value = raw.strip()
    if "://" in value:
        value = urlsplit(value).path
    prefix = ctx.settings.base_path + "/"
    if value.startswith(prefix):
        value = value[len(prefix) :]
    elif value.startswith("/"):
        raise Problem(400, "BAD_REQUEST", f"Stream-Forked-From must name a stream under {prefix}")
    return ctx.validate_path(unquote(value))


async def handle_put(ctx: Context, request: Request) -> Response:
    path = ctx.stream_path(request)
    headers = request.headers
    ttl = parse_ttl(headers.get("stream-ttl"))
    expires_at = parse_expires_at(headers.get("stream-expires-at"))
    if ttl is not None and expires_at is not None:
        raise Problem(400, "BAD_REQUEST", "send Stream-TTL or Stream-Expires-At, not both")
    closed = parse_closed(headers.get("stream-closed"))
    content_type = parse_content_type(headers.get("content-type"))
    fork_raw = headers.get("stream-forked-from")
    offset_raw = headers.get("stream-fork-offset")
    sub_raw = headers.get("stream-fork-sub-offset")
    if fork_raw is None and (offset_raw is not None or sub_raw is not None):
        raise Problem(400, "BAD_REQUEST", "fork offsets need Stream-Forked-From")
    sub_offset = parse_sub_offset(sub_raw)
    fork_offset = None
    if offset_raw is not None:
        fork_offset = parse_offset_value(offset_raw, what="Stream-Fork-Offset")
    if sub_offset and fork_offset is None:
        raise Problem(400, "BAD_REQUEST", "Stream-Fork-Sub-Offset needs Stream-Fork-Offset")
    fork_from = None if fork_raw is None else _source_path(ctx, fork_raw)
    body = await ctx.body(request)

    prefix: bytes | None = None
    if fork_from is not None:
        try:
            source = await ctx.store.head(fork_from)
        except StreamNotFound:
            raise Problem(
                404, "FORK_SOURCE_NOT_FOUND", f"fork source {fork_from!r} not found"
            ) from None
        except StreamGone:
            raise Problem(409, "STREAM_DELETED", f"fork source {fork_from!r} was deleted") from None
        if content_type is None:
            content_type = source.content_type
        if ttl is None and expires_at is None:  # a fork inherits its source's lifetime
            ttl, expires_at = source.ttl_seconds, source.expires_at
        if sub_offset:
            assert fork_offset is not None
            if is_json_content_type(source.content_type):
                # JSON messages are stored one per value: a sub-offset is a message count.
                base = parse_offset(fork_offset)
                tail = parse_offset(source.next_offset) or 0
                position = (tail if base is None else base) + sub_offset
                if position > tail:
                    raise Problem(400, "BAD_OFFSET", "Stream-Fork-Sub-Offset is past the tail")
                fork_offset, sub_offset = format_offset(position), 0
            else:
                cut = await ctx.store.read(fork_from, fork_offset, limit=1, renew_ttl=False)
                if not cut.messages:
                    raise Problem(400, "BAD_OFFSET", "no message after Stream-Fork-Offset to cut")
                if sub_offset > len(cut.messages[0].data):
                    raise Problem(400, "BAD_OFFSET", "Stream-Fork-Sub-Offset is past the message")
                prefix = cut.messages[0].data[:sub_offset]
    content_type = content_type or DEFAULT_CONTENT_TYPE
    messages = _messages(body, content_type, path=path, creating=True)
    if prefix is not None:
        messages.insert(0, prefix)
    op = Create(
        path,
        content_type,
        ttl,
        expires_at,
        closed,
        fork_from,
        fork_offset,
        messages,
        fork_sub_offset=sub_offset,
    )
    result = (await ctx.store.commit([op]))[0]
    assert isinstance(result, CreateResult)
    info = result.info
    if result.created:
        ctx.subscriptions.observe(path, before=0, created=True)
    out = {"Content-Type": info.content_type, NEXT_OFFSET: info.next_offset}
    if info.closed:
        out[CLOSED] = "true"
    if not result.created:
        return reply(200, out)
    out["Location"] = str(request.url.replace(query="", fragment=""))
    return reply(201, out)


async def handle_post(ctx: Context, request: Request) -> Response:
    path = ctx.stream_path(request)
    headers = request.headers
    close = parse_closed(headers.get("stream-closed"))
    producer = parse_producer(
        headers.get("producer-id"), headers.get("producer-epoch"), headers.get("producer-seq")
    )
    stream_seq = parse_stream_seq(headers.get("stream-seq"))
    content_type = parse_content_type(headers.get("content-type"))
    body = await ctx.body(request)
    if body and content_type is None:
        raise Problem(400, "BAD_REQUEST", "an append with a body needs a Content-Type")
    if not body and not close:
        raise Problem(400, "BAD_REQUEST", "the body is empty; send data or Stream-Closed: true")
    messages = _messages(body, content_type or "", path=path, creating=False)
    op = Append(path, messages, content_type if body else None, producer, stream_seq, close)
    result = (await ctx.store.commit([op]))[0]
    assert isinstance(result, AppendResult)
    if messages and not result.duplicate:
        tail = parse_offset(result.next_offset) or 0
        ctx.subscriptions.observe(path, before=tail - len(messages), created=False)
    out = {NEXT_OFFSET: result.next_offset}
    if result.closed:
        out[CLOSED] = "true"
    if result.producer is not None:
        out["Producer-Epoch"] = str(result.producer.epoch)
        out["Producer-Seq"] = str(result.producer.seq)
    fresh = producer is not None and not result.duplicate and bool(messages)
    return reply(200 if fresh else 204, out)


async def handle_delete(ctx: Context, request: Request) -> Response:
    await ctx.store.delete(ctx.stream_path(request))
    return reply(204, {})
