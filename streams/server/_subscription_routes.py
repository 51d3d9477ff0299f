"""HTTP routes of the reserved ``{base}/__ds/...`` namespace (subscriptions and their JWKS)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ._context import Context, reply
from ._protocol import Problem
from ._subscriptions import normalize_config

__all__ = ["handle_reserved"]

_JSON = {"Content-Type": "application/json", "Cache-Control": "no-store"}


async def _json_body(ctx: Context, request: Request) -> Any:
    raw = await ctx.body(request)
    try:
        return orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise Problem(400, "BAD_REQUEST", "the body is not valid JSON") from None


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _json(status: int, value: object) -> Response:
    return reply(status, _JSON, orjson.dumps(value))


async def handle_reserved(ctx: Context, request: Request) -> Response:
    rest = str(request.path_params.get("rest", ""))
    method = request.method
    subs = ctx.subscriptions
    if rest == "jwks.json" and method in ("GET", "HEAD"):
        headers = {"Content-Type": "application/jwk-set+json", "Cache-Control": "max-age=300"}
        return reply(200, headers, orjson.dumps(await subs.jwks()))
    parts = rest.split("/")
    if parts[0] != "subscriptions" or len(parts) < 2 or not parts[1]:
        raise Problem(404, "NOT_FOUND", f"no reserved route {rest[:200]!r}")
    sub_id, tail = parts[1], parts[2:]
    if not tail:
        if method == "PUT":
            config = normalize_config(await _json_body(ctx, request), ctx.validate_path)
            await subs.check_webhook(config)
            base_url = str(request.base_url).rstrip("/") + ctx.settings.base_path
            status, view = await subs.put(sub_id, config, base_url)
            return _json(status, view)
        if method in ("GET", "HEAD"):
            return _json(200, await subs.get(sub_id))
        if method == "DELETE":
            await subs.delete(sub_id)
            return reply(204, {})
    elif tail == ["streams"] and method == "POST":
        body = await _json_body(ctx, request)
        paths = body.get("streams") if isinstance(body, dict) else None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise Problem(400, "BAD_REQUEST", 'the body must be {"streams": [paths]}')
        await subs.add_streams(sub_id, [ctx.validate_path(p) for p in paths])
        return reply(204, {})
    elif tail[0] == "streams" and len(tail) > 1 and method == "DELETE":
        await subs.remove_stream(sub_id, "/".join(tail[1:]))
        return reply(204, {})
    elif len(tail) == 1 and method == "POST":
        action = tail[0]
        if action in ("callback", "ack"):
            body = await _json_body(ctx, request)
            return _json(200, await subs.settle(sub_id, body, _bearer(request)))
        if action == "claim":
            claimed = await subs.claim(sub_id, await _json_body(ctx, request))
            return reply(204, {}) if claimed is None else _json(200, claimed)
        if action == "release":
            await subs.release(sub_id, await _json_body(ctx, request), _bearer(request))
            return reply(204, {})
    raise Problem(404, "NOT_FOUND", f"no reserved route {method} {rest[:200]!r}")
