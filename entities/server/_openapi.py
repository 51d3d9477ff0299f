"""The control plane's OpenAPI document (``GET /openapi.json``): request bodies from the routes'
pydantic models, responses from the models below, errors in the one JSON error shape.

A test checks that every control-plane route and method is documented here, and a bounded
schemathesis run against a real server checks the answers against this document.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._urls import SEGMENT_PATTERN
from ._routes import (
    CallBody,
    CronBody,
    DecisionBody,
    EditBody,
    ForkBody,
    SendBody,
    SignalBody,
    SpawnBody,
    TagBody,
    json_response,
)

__all__ = ["openapi_document", "openapi_route"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class EntityInfoOut(_Open):
    url: str
    type: str
    id: str
    status: str


class ReceiptOut(_Open):
    url: str
    key: str
    offset: str


class CompactionOut(_Open):
    entities: int
    events: int
    bytes: int
    text_deltas: int
    steps: int
    prefix: int
    truncated: dict[str, str]


class PurgedOut(BaseModel):
    purged: list[str]


class RepliesOut(_Open):
    key: str
    replies: list[Any]
    status: str
    error: str | None = None


class CallOut(_Open):
    url: str
    key: str
    offset: str
    replies: list[Any]
    status: str
    error: str | None = None
    timed_out: bool


_SCHEMAS: dict[str, type[BaseModel]] = {
    "Error": ErrorBody,
    "EntityInfo": EntityInfoOut,
    "SendReceipt": ReceiptOut,
    "Replies": RepliesOut,
    "CallResult": CallOut,
    "Compaction": CompactionOut,
    "Purged": PurgedOut,
    "SpawnBody": SpawnBody,
    "SendBody": SendBody,
    "CallBody": CallBody,
    "ForkBody": ForkBody,
    "DecisionBody": DecisionBody,
    "EditBody": EditBody,
    "SignalBody": SignalBody,
    "CronBody": CronBody,
    "TagBody": TagBody,
}

_OBJECT: dict[str, Any] = {"type": "object"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    status: int,
    schema: dict[str, Any] | None,
    *,
    body: str | None = None,
    query: tuple[str, ...] = (),
    idempotent: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "default": _json(_ref("Error"), "an error, in the control plane's JSON error shape")
    }
    responses[str(status)] = {"description": summary} if schema is None else _json(schema, summary)
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    parameters = [{"name": q, "in": "query", "schema": {"type": "string"}} for q in query]
    if idempotent:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "schema": {"type": "string", "minLength": 1, "maxLength": 256},
            }
        )
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"content": {"application/json": {"schema": _ref(body)}}}
    return op


def _call_op() -> dict[str, Any]:
    """``POST …/call``: 200 once answered (replies, or a wake given up), 202 when the wait
    ran out first (``timed_out: true``; the message stays sent)."""
    op = _op(
        "send a message and wait for its replies (or the error of a wake given up)",
        200,
        _ref("CallResult"),
        body="CallBody",
        query=("wait_ms",),
        idempotent=True,
    )
    op["responses"]["202"] = _json(
        _ref("CallResult"), "no answer within wait_ms (timed_out: true); the message was sent"
    )
    return op


def _path_params(*names: str) -> list[dict[str, Any]]:
    segment = {"type": "string", "pattern": SEGMENT_PATTERN}
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": segment if name in ("type", "id") else {"type": "string", "minLength": 1},
        }
        for name in names
    ]


_LETTER = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}


def _control_paths(entity: str, info: dict[str, Any]) -> dict[str, Any]:
    """The paths that control a living entity: fork, queued messages, approvals, signals."""
    return {
        entity + "/fork": {
            "parameters": _path_params("type", "id"),
            "post": _op(
                "fork: a new entity sharing this one's history", 201, info, body="ForkBody"
            ),
        },
        entity + "/inbox/{key}": {
            "parameters": _path_params("type", "id", "key"),
            "patch": _op("edit a queued message", 200, _OBJECT, body="EditBody"),
            "delete": _op("cancel a queued message", 200, _OBJECT),
        },
        entity + "/approvals": {
            "parameters": _path_params("type", "id"),
            "get": _op("approvals asked for by its agent runs", 200, {"type": "array"}),
        },
        entity + "/approvals/{approval}": {
            "parameters": _path_params("type", "id", "approval"),
            "post": _op("approve or deny", 200, _OBJECT, body="DecisionBody"),
        },
        entity + "/signal": {
            "parameters": _path_params("type", "id"),
            "post": _op("pause, resume or interrupt", 200, info, body="SignalBody"),
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the control plane and the health checks."""
    entity = "/_entities/entities/{type}/{id}"
    info, entities = _ref("EntityInfo"), {"type": "array", "items": _ref("EntityInfo")}
    paths: dict[str, Any] = {
        "/_entities/types": {"get": _op("the entity types", 200, {"type": "array"})},
        "/_entities/workers": {"get": _op("the workers on the store", 200, {"type": "array"})},
        "/_entities/entities": {
            "get": _op("entities", 200, entities, query=("type", "status", "tag", "parent"))
        },
        entity: {
            "parameters": _path_params("type", "id"),
            "put": _op("spawn", 201, info, body="SpawnBody", idempotent=True),
            "get": _op("inspect", 200, _OBJECT),
            "head": _op("whether it exists", 200, None),
            "delete": _op(
                "kill; with purge=true, delete for good (recursive=true: its descendants too)",
                200,
                {"anyOf": [info, _ref("Purged")]},
                query=("purge", "recursive"),
            ),
        },
        entity + "/send": {
            "parameters": _path_params("type", "id"),
            "post": _op(
                "send a message", 202, _ref("SendReceipt"), body="SendBody", idempotent=True
            ),
        },
        entity + "/call": {
            "parameters": _path_params("type", "id"),
            "post": _call_op(),
        },
        **_control_paths(entity, info),
        entity + "/tags/{key}": {
            "parameters": _path_params("type", "id", "key"),
            "post": _op("set a tag", 200, info, body="TagBody"),
            "put": _op("set a tag", 200, info, body="TagBody"),
            "delete": _op("remove a tag", 200, info),
        },
        entity + "/schedules": {
            "parameters": _path_params("type", "id"),
            "get": _op("schedules", 200, {"type": "array"}),
        },
        entity + "/schedules/{schedule}": {
            "parameters": _path_params("type", "id", "schedule"),
            "put": _op("set a cron schedule", 200, _OBJECT, body="CronBody"),
            "delete": _op("cancel a schedule", 200, _OBJECT),
        },
        entity + "/replies/{key}": {
            "parameters": _path_params("type", "id", "key"),
            "get": _op("replies to a message", 200, _ref("Replies"), query=("wait_ms", "after")),
        },
        entity + "/compact": {
            "parameters": _path_params("type", "id"),
            "post": _op("compact its stream now", 200, _ref("Compaction")),
        },
        "/_entities/compact": {"post": _op("compact every entity now", 200, _ref("Compaction"))},
        "/_entities/dead-letters": {
            "get": _op("dead letters", 200, {"type": "array"}, query=("type", "url"))
        },
        "/_entities/dead-letters/{id}": {
            "parameters": [_LETTER],
            "delete": _op("discard a dead letter", 200, _OBJECT),
        },
        "/_entities/dead-letters/{id}/retry": {
            "parameters": [_LETTER],
            "post": _op("retry a dead letter", 202, _OBJECT),
        },
        "/healthz": {"get": _op("the process serves", 200, _OBJECT)},
        "/readyz": {"get": _op("ready: store, schema, worker", 200, _OBJECT)},
    }
    schemas = {
        name: model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        for name, model in _SCHEMAS.items()
    }
    for schema in list(schemas.values()):  # nested models: lift them into components
        for name, nested in schema.pop("$defs", {}).items():
            schemas.setdefault(name, nested)
    return {
        "openapi": "3.1.0",
        "info": {"title": "entities control plane", "version": "1"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def openapi_route() -> Route:
    """``GET /openapi.json``."""
    document = openapi_document()

    async def serve_document(request: Request) -> Response:
        return json_response(document)

    return Route("/openapi.json", serve_document, methods=["GET"])
