"""The host tools every agent can use: send, spawn, and schedules (list, upsert, delete)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ._host import ToolContext
from ._tools import Tool

__all__ = ["runtime_tools"]


class SendArgs(BaseModel):
    url: str = Field(description="The entity to message, as /type/id")
    payload: Any = Field(description="The message (any JSON)")
    type: str | None = Field(default=None, description="Message type, if the entity has several")
    after_ms: int | None = Field(default=None, ge=0, description="Deliver this much later")


class SpawnArgs(BaseModel):
    type: str = Field(description="Entity type to create")
    id: str = Field(description="Id of the new entity")
    args: dict[str, Any] = Field(default_factory=dict, description="Creation arguments")
    initial_message: Any = Field(default=None, description="A first message to deliver")


class CronArgs(BaseModel):
    id: str = Field(description="Schedule id (re-using an id replaces that schedule)")
    expression: str = Field(description="Cron expression, e.g. '0 9 * * 1-5'")
    timezone: str = Field(default="UTC", description="IANA timezone name")
    payload: Any = Field(default=None, description="Passed along with every tick")


class FutureSendArgs(BaseModel):
    url: str = Field(description="The entity to message, as /type/id")
    payload: Any = Field(description="The message (any JSON)")
    after_ms: int = Field(ge=0, description="Delay before delivery")
    type: str | None = None


class DeleteArgs(BaseModel):
    id: str = Field(description="Cron schedule id, or the key a delayed send returned")


class NoArgs(BaseModel):
    pass


def runtime_tools(ctx: ToolContext) -> list[Tool]:
    """The host tools bound to one wake's context (``ctx.runtime_tools``)."""

    async def send(args: SendArgs) -> dict[str, Any]:
        key = await ctx.send(args.url, args.payload, type=args.type, after_ms=args.after_ms)
        return {"sent": True, "key": key, "url": args.url}

    async def spawn(args: SpawnArgs) -> dict[str, Any]:
        handle = await ctx.spawn(
            args.type, args.id, args=args.args, initial_message=args.initial_message
        )
        return {"spawned": handle.url}

    def list_schedules(args: NoArgs) -> list[dict[str, Any]]:
        return [entry.model_dump(mode="json") for entry in ctx.list_schedules()]

    def upsert_cron(args: CronArgs) -> dict[str, Any]:
        entry = ctx.schedule_cron(
            args.id, args.expression, payload=args.payload, timezone=args.timezone
        )
        return entry.model_dump(mode="json")

    async def upsert_future_send(args: FutureSendArgs) -> dict[str, Any]:
        key = await ctx.send(args.url, args.payload, type=args.type, after_ms=args.after_ms)
        return {"scheduled": True, "key": key}

    def delete_schedule(args: DeleteArgs) -> dict[str, Any]:
        return {"deleted": ctx.cancel_schedule(args.id)}

    return [
        Tool(
            "send_message", "Send a message to another entity (optionally delayed).", SendArgs, send
        ),
        Tool(
            "spawn_entity",
            "Create a child entity; you are woken when its run finishes.",
            SpawnArgs,
            spawn,
        ),
        Tool(
            "list_schedules",
            "List this entity's cron schedules and delayed sends.",
            NoArgs,
            list_schedules,
        ),
        Tool(
            "upsert_cron_schedule",
            "Create or replace a cron schedule that wakes this entity.",
            CronArgs,
            upsert_cron,
        ),
        Tool(
            "upsert_future_send",
            "Schedule a message to be sent later.",
            FutureSendArgs,
            upsert_future_send,
        ),
        Tool(
            "delete_schedule",
            "Cancel a cron schedule or a pending delayed send.",
            DeleteArgs,
            delete_schedule,
        ),
    ]
