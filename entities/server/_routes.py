"""Control-plane routes (JSON in and out; errors as ``{"error": {"code", "message"}}``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from streams import BadOffset, OffsetGone, StorageFull

from .._approvals import approval_json
from .._errors import ContextError, EntitiesError, InvalidEntityURL, SchemaValidationFailed
from .._idempotency import check_key
from .._runtime import Runtime
from .._signals import SendMode, SignalName
from .._timers import next_cron
from .._urls import EntityURL, check_segment, parse_url
from ._auth import Principal

__all__ = [
    "FLAG_VALUES",
    "PRINCIPAL_KEY",
    "CallBody",
    "CronBody",
    "DecisionBody",
    "EditBody",
    "ForkBody",
    "SendBody",
    "SignalBody",
    "SpawnBody",
    "TagBody",
    "control_routes",
    "error_response",
    "json_response",
]

PRINCIPAL_KEY = "entities.principal"  # where ``_access.Authorize`` leaves the request's principal
# what a boolean query parameter (``?purge=true``) may say
FLAG_VALUES = {"true": True, "1": True, "false": False, "0": False}
MAX_WAIT_MS = 120_000  # the longest wait of a call or a reply long-poll
CALL_WAIT_MS = 30_000  # a call's wait when it names none


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return json_response({"error": error}, status)


class _Problem(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.response = error_response(status, code, message, details)


class SpawnBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    args: dict[str, Any] | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    initial_message: Any = None
    initial_message_type: str | None = None
    parent: str | None = None


class ForkBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    at: str | None = None


class SignalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signal: SignalName
    reason: str | None = None


class EditBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    payload: Any = None
    type: str | None = None


class DecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "deny"]
    note: str | None = None


class AttachmentBody(BaseModel):
    """A file a message carries by reference (checked further by ``Runtime.send``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["image", "file", "audio", "video"]
    name: str | None = None
    mime: str | None = None
    url: str | None = None  # http(s): or data:
    stream: str | None = None  # or a stream path on this server


class SendBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    payload: Any = None
    type: str | None = None
    mode: SendMode = "queued"
    sender: str | None = Field(default=None, alias="from")
    attachments: list[AttachmentBody] | None = Field(default=None, max_length=20)

    def attachment_dicts(self) -> list[dict[str, Any]] | None:
        """The attachments as :meth:`~entities.Runtime.send` takes them."""
        if self.attachments is None:
            return None
        return [a.model_dump(exclude_none=True) for a in self.attachments]


class CallBody(SendBody):
    wait_ms: int | None = Field(default=None, ge=0, le=MAX_WAIT_MS)


def _wait_ms(request: Request, body: int | None) -> int:
    """A call's wait: ``wait_ms`` of the query, else of the body, else 30 s.

    Raises:
        _Problem: not an integer from 0 to 120000 (400).
    """
    raw = request.query_params.get("wait_ms")
    if raw is None:
        return CALL_WAIT_MS if body is None else body
    if not raw.isdigit() or int(raw) > MAX_WAIT_MS:
        raise _Problem(400, "BAD_REQUEST", f"wait_ms must be an integer from 0 to {MAX_WAIT_MS}")
    return int(raw)


def _names_an_entity(sender: str) -> bool:
    """Whether ``sender`` has the shape of an entity URL (``/type/id``)."""
    try:
        parse_url(sender)
    except InvalidEntityURL:
        return False
    return True


class CronBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expression: str
    timezone: str = "UTC"
    payload: Any = None


class TagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str


async def _body(request: Request, model: type[BaseModel], limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Problem(413, "BODY_TOO_LARGE", f"request body is larger than {limit} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _Problem(413, "BODY_TOO_LARGE", f"request body is larger than {limit} bytes")
    if not raw.strip():
        raw = b"{}"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Problem(400, "INVALID_JSON", f"request body is not JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)]
        raise _Problem(
            422, "SCHEMA_VALIDATION_FAILED", "request body has the wrong shape", details
        ) from None


def _target(request: Request) -> EntityURL:
    try:
        return EntityURL(
            check_segment(request.path_params["type"], "type"),
            check_segment(request.path_params["id"], "id"),
        )
    except EntitiesError as exc:
        raise _Problem(exc.status, exc.code, exc.message) from None


def _flag(request: Request, name: str) -> bool:
    """The boolean query parameter ``name`` (``true``/``1``, ``false``/``0``; absent: false).

    Raises:
        _Problem: another value (400).
    """
    value = request.query_params.get(name, "false").lower()
    if value not in FLAG_VALUES:
        raise _Problem(400, "BAD_REQUEST", f"{name} must be true or false, not {value!r}")
    return FLAG_VALUES[value]


def _idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` header, checked (1-256 printable ASCII characters)."""
    key = request.headers.get("idempotency-key")
    return None if key is None else check_key(key)


def _with_next_fire(schedule: dict[str, Any], now: float) -> dict[str, Any]:
    """``schedule`` with ``next_fire_at`` (epoch seconds): when an active cron schedule fires
    next, or a pending delayed send is due; ``None`` for the others."""
    at: float | None = None
    if schedule.get("schedule_type") == "cron" and schedule.get("status") == "active":
        try:
            at = next_cron(schedule["expression"], schedule.get("timezone") or "UTC", now)
        except ContextError:
            at = None
    elif schedule.get("status") == "pending":
        at = schedule.get("fire_at")
    return {**schedule, "next_fire_at": at}


def _principal(request: Request) -> Principal | None:
    """The principal that made ``request`` (``None`` when the server has no auth)."""
    found = request.scope.get(PRINCIPAL_KEY)
    return found if isinstance(found, Principal) else None


def _sender(request: Request, target: EntityURL, named: str | None) -> str:
    """The ``from`` of a message sent over HTTP: the principal's sender id (``principal:NAME``);
    only a principal with ``admin`` on the target may name another; without auth, ``named``
    or ``/_http/client``.

    Raises:
        _Problem: ``named`` is an entity URL (422), or another sender named by a non-admin (403).
    """
    if named is not None and _names_an_entity(named):
        raise _Problem(
            422,
            "INVALID_SENDER",
            f"'from' {named!r} names an entity: only the runtime sends as an entity "
            "(a handler would take it for that entity's message). Name the sender in a way "
            "of your own, e.g. 'user:alice' or '/_app/billing'.",
        )
    principal = _principal(request)
    if principal is None:
        return named or "/_http/client"
    if named is None or named == principal.sender:
        return principal.sender
    if principal.allows("admin", target.url):
        return named
    raise _Problem(
        403,
        "FORBIDDEN_SENDER",
        f"principal {principal.name!r} sends as {principal.sender!r}; naming another sender "
        f"in 'from' needs 'admin' on {target.url}",
        {"action": "admin", "url": target.url},
    )


_Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(fn: _Endpoint) -> _Endpoint:
    """``fn`` with the control plane's errors answered as JSON error responses."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except _Problem as problem:
            return problem.response
        except SchemaValidationFailed as exc:
            return error_response(exc.status, exc.code, exc.message, exc.errors)
        except EntitiesError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except BadOffset as exc:
            return error_response(400, "BAD_OFFSET", str(exc))
        except OffsetGone as exc:  # truncated by compaction (Retention.keep_for)
            return error_response(410, "OFFSET_GONE", exc.message)
        except StorageFull as exc:
            return error_response(507, "INSUFFICIENT_STORAGE", exc.message)
        except ClientDisconnect:  # a body cut short or badly framed: uvicorn logged one line
            return error_response(400, "BAD_REQUEST", "the request body ended early")

    return endpoint


class _ControlPlane:
    """The ``/_entities`` endpoints over one runtime, one method each."""

    def __init__(self, runtime: Runtime, max_body_bytes: int) -> None:
        self.runtime = runtime
        self.max_body_bytes = max_body_bytes

    async def types(self, request: Request) -> Response:
        return json_response([t.describe() for t in self.runtime.registry.list()])

    async def workers(self, request: Request) -> Response:
        return json_response([dataclasses.asdict(w) for w in await self.runtime.workers()])

    async def list_entities(self, request: Request) -> Response:
        q = request.query_params
        found = await self.runtime.list_entities(
            type=q.get("type"), status=q.get("status"), tag=q.get("tag"), parent=q.get("parent")
        )
        principal = _principal(request)
        if principal is not None:  # only what this principal may read
            found = [info for info in found if principal.allows("read", info.url)]
        return json_response([info.to_json() for info in found])

    async def spawn(self, request: Request) -> Response:
        runtime = self.runtime
        target = _target(request)
        key = _idempotency_key(request)
        runtime.registry.get(target.type)
        body = await _body(request, SpawnBody, self.max_body_bytes)
        if body.parent is not None:
            raise _Problem(
                422,
                "INVALID_PARENT",
                "'parent' is set by the runtime alone (an entity that spawns a child); "
                "an entity spawned over HTTP has none",
            )
        info = await runtime.spawn(
            target.url,
            args=body.args,
            tags=body.tags,
            initial_message=body.initial_message,
            initial_message_type=body.initial_message_type,
            idempotency_key=key,
        )
        return json_response(info.to_json(), 201)

    async def get_entity(self, request: Request) -> Response:
        target = _target(request)
        if request.method == "HEAD":
            await self.runtime.get(target.url)
            return Response(status_code=200)
        return json_response(await self.runtime.inspect(target.url))

    async def kill(self, request: Request) -> Response:
        target = _target(request)
        purge, recursive = _flag(request, "purge"), _flag(request, "recursive")
        if purge:
            purged = await self.runtime.purge(target.url, recursive=recursive)
            return json_response({"purged": purged})
        if recursive:
            raise _Problem(400, "BAD_REQUEST", "recursive=true goes with purge=true")
        await self.runtime.kill(target.url)
        return json_response((await self.runtime.get(target.url)).to_json())

    async def fork(self, request: Request) -> Response:
        target = _target(request)
        body = await _body(request, ForkBody, self.max_body_bytes)
        new_url = f"/{target.type}/{body.id}"
        principal = _principal(request)
        if principal is not None and not principal.allows("spawn", new_url):
            raise _Problem(
                403,
                "FORBIDDEN",
                f"principal {principal.name!r} may not spawn {new_url} (fork creates it)",
            )
        info = await self.runtime.fork(target.url, body.id, at=body.at)
        return json_response(info.to_json(), 201)

    async def inbox(self, request: Request) -> Response:
        target = _target(request)
        key = request.path_params["key"]
        self.runtime.registry.get(target.type)
        if request.method == "DELETE":
            await self.runtime.cancel_message(target.url, key)
            return json_response({"key": key, "cancelled": True})
        body = await _body(request, EditBody, self.max_body_bytes)
        row = await self.runtime.edit_message(target.url, key, body.payload, type=body.type)
        return json_response({"key": key, **row})

    async def approvals(self, request: Request) -> Response:
        target = _target(request)
        found = await self.runtime.approvals(target.url)
        return json_response([approval_json(a) for a in found])

    async def approval(self, request: Request) -> Response:
        target = _target(request)
        body = await _body(request, DecisionBody, self.max_body_bytes)
        principal = _principal(request)
        decided = await self.runtime.decide(
            target.url,
            request.path_params["approval"],
            body.decision,
            note=body.note,
            by=principal.sender if principal is not None else "/_http/client",
        )
        return json_response(approval_json(decided))

    async def signal(self, request: Request) -> Response:
        target = _target(request)
        body = await _body(request, SignalBody, self.max_body_bytes)
        principal = _principal(request)
        sender = principal.sender if principal is not None else "/_http/client"
        info = await self.runtime.signal(target.url, body.signal, reason=body.reason, sender=sender)
        return json_response(info.to_json())

    async def send(self, request: Request) -> Response:
        runtime = self.runtime
        target = _target(request)
        key = _idempotency_key(request)
        runtime.registry.get(target.type)
        body = await _body(request, SendBody, self.max_body_bytes)
        sender = _sender(request, target, body.sender)
        receipt = await runtime.send(
            target.url,
            body.payload,
            type=body.type,
            sender=sender,
            idempotency_key=key,
            mode=body.mode,
            attachments=body.attachment_dicts(),
        )
        return json_response(receipt.to_json(), 202)

    async def call(self, request: Request) -> Response:
        """Send, and answer with the replies (or the error of a wake given up) in the same
        response: 200 once answered, 202 with ``timed_out: true`` when ``wait_ms`` ran out
        first (the message stays sent)."""
        runtime = self.runtime
        target = _target(request)
        key = _idempotency_key(request)
        runtime.registry.get(target.type)
        body = await _body(request, CallBody, self.max_body_bytes)
        wait_ms = _wait_ms(request, body.wait_ms)
        sender = _sender(request, target, body.sender)
        result = await runtime.call(
            target.url,
            body.payload,
            type=body.type,
            sender=sender,
            idempotency_key=key,
            mode=body.mode,
            wait=wait_ms / 1000,
            attachments=body.attachment_dicts(),
        )
        return json_response(result.to_json(), 202 if result.timed_out else 200)

    async def tag(self, request: Request) -> Response:
        target = _target(request)
        key = request.path_params["key"]
        if request.method == "DELETE":
            await self.runtime.remove_tag(target.url, key)
        else:
            body = await _body(request, TagBody, self.max_body_bytes)
            await self.runtime.set_tag(target.url, key, body.value)
        return json_response((await self.runtime.get(target.url)).to_json())

    async def replies(self, request: Request) -> Response:
        runtime = self.runtime
        target = _target(request)
        key = request.path_params["key"]
        raw_wait = request.query_params.get("wait_ms", "0")
        after = request.query_params.get("after", "-1")
        if not raw_wait.isdigit() or int(raw_wait) > 120_000:
            raise _Problem(400, "BAD_REQUEST", "wait_ms must be an integer from 0 to 120000")
        await runtime.get(target.url)
        # woken by the commit that answers this message, not by every append (_awaiting)
        found, _timed_out = await runtime.wait_outcome(
            target.url, key, after=after, wait=int(raw_wait) / 1000
        )
        return json_response(
            {"key": key, "replies": found.replies, "status": found.status, "error": found.error}
        )

    async def schedules(self, request: Request) -> Response:
        target = _target(request)
        now = self.runtime.clock.now()
        return json_response(
            [_with_next_fire(s, now) for s in await self.runtime.schedules(target.url)]
        )

    async def schedule(self, request: Request) -> Response:
        target = _target(request)
        schedule_id = request.path_params["schedule"]
        if request.method == "DELETE":
            if not await self.runtime.cancel_schedule(target.url, schedule_id):
                raise _Problem(404, "SCHEDULE_NOT_FOUND", f"no schedule {schedule_id!r}")
            return json_response({"cancelled": schedule_id})
        body = await _body(request, CronBody, self.max_body_bytes)
        entry = await self.runtime.schedule_cron(
            target.url, schedule_id, body.expression, timezone=body.timezone, payload=body.payload
        )
        return json_response(entry)

    async def compact(self, request: Request) -> Response:
        """Compact one entity (``/entities/{type}/{id}/compact``) or all (``/compact``)."""
        url = _target(request).url if "type" in request.path_params else None
        return json_response((await self.runtime.compact(url)).to_json())

    async def dead_letters(self, request: Request) -> Response:
        q = request.query_params
        url = q.get("url")
        if url is not None:
            url = parse_url(url).url
        letters = await self.runtime.dead_letters(type=q.get("type"), url=url)
        return json_response([letter.to_json() for letter in letters])

    async def dead_letter(self, request: Request) -> Response:
        id = request.path_params["id"]
        if request.method == "DELETE":
            letter = await self.runtime.discard_dead_letter(id)
            return json_response({"discarded": letter.id})
        letter = await self.runtime.retry_dead_letter(id)
        return json_response({"retried": letter.id, "url": letter.url}, 202)


def control_routes(runtime: Runtime, *, max_body_bytes: int = 1024 * 1024) -> list[Route]:
    """The ``/_entities`` routes over ``runtime``."""
    plane = _ControlPlane(runtime, max_body_bytes)
    base = "/_entities/entities/{type}/{id}"
    table: list[tuple[str, _Endpoint, list[str]]] = [
        ("/_entities/types", plane.types, ["GET"]),
        ("/_entities/entities", plane.list_entities, ["GET"]),
        ("/_entities/workers", plane.workers, ["GET"]),
        (base, plane.spawn, ["PUT"]),
        (base, plane.get_entity, ["GET", "HEAD"]),
        (base, plane.kill, ["DELETE"]),
        (base + "/send", plane.send, ["POST"]),
        (base + "/call", plane.call, ["POST"]),
        (base + "/fork", plane.fork, ["POST"]),
        (base + "/signal", plane.signal, ["POST"]),
        (base + "/approvals", plane.approvals, ["GET"]),
        (base + "/approvals/{approval}", plane.approval, ["POST"]),
        (base + "/inbox/{key}", plane.inbox, ["PATCH", "DELETE"]),
        (base + "/tags/{key}", plane.tag, ["POST", "PUT", "DELETE"]),
        (base + "/schedules", plane.schedules, ["GET"]),
        (base + "/schedules/{schedule}", plane.schedule, ["PUT", "DELETE"]),
        (base + "/replies/{key}", plane.replies, ["GET"]),
        (base + "/compact", plane.compact, ["POST"]),
        ("/_entities/compact", plane.compact, ["POST"]),
        ("/_entities/dead-letters", plane.dead_letters, ["GET"]),
        ("/_entities/dead-letters/{id}", plane.dead_letter, ["DELETE"]),
        ("/_entities/dead-letters/{id}/retry", plane.dead_letter, ["POST"]),
    ]
    return [Route(path, _guarded(fn), methods=methods) for path, fn, methods in table]
