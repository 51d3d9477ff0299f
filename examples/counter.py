"""A counter: ``{"add": n}`` adds n to the row ``total`` of collection ``totals`` and replies
with the new total.

    entities run examples/counter.py:registry /counter/c1 '{"add": 5}' --json
"""

from __future__ import annotations

from pydantic import BaseModel

from entities import HandlerContext, Registry, WakeEvent, collection


class Total(BaseModel):
    key: str
    value: int = 0


class Add(BaseModel):
    add: int


registry = Registry()


@registry.define(
    "counter",
    description="Adds numbers and replies with the running total",
    state={"totals": collection(Total, primary_key="key")},
    inbox=Add,
)
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    totals = ctx.db.collections.totals
    for message in wake.messages:
        current = totals.get("total")
        if current is None:
            ctx.db.actions.totals_insert(row=Total(key="total", value=message.payload["add"]))
        else:
            ctx.db.actions.totals_update(
                key="total",
                updater=Total(key="total", value=current.value + message.payload["add"]),
            )
        ctx.reply(totals.get("total").value, to=message)
