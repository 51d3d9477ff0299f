"""A small stateful conversation: keeps the last 20 messages as history.

``on_message`` rejects empty or over-10,000-character messages with a clear reply (the handler
never sees them); ``on_error`` tells the user something friendly when a wake fails for good,
while the failure stays recorded with its traceback. Send ``"boom"`` to see it.

    entities run examples/chat.py:registry /chat/c1 "hello"
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from entities import HandlerContext, InboxMessage, Registry, WakeEvent, collection

MAX_CHARS = 10_000
HISTORY = 20


class Turn(BaseModel):
    key: str
    role: str
    text: str


registry = Registry()


def check(ctx: HandlerContext, message: InboxMessage) -> str | None:
    text = message.text
    if text is None or not text.strip():
        return "Please send a non-empty text message."
    if len(text) > MAX_CHARS:
        return f"That message has {len(text)} characters; the limit is {MAX_CHARS}."
    return None


def apologise(ctx: HandlerContext, error: BaseException) -> None:
    ctx.reply("Sorry, something went wrong on my side. The error has been recorded.")


def _remember(ctx: HandlerContext, role: str, text: str) -> None:
    history = ctx.state.history
    n = int(ctx.state.meta.get("counter").value) + 1 if "counter" in ctx.state.meta else 1
    ctx.state.meta.upsert(Meta(key="counter", value=n))
    history.insert(Turn(key=f"{n:08d}", role=role, text=text))
    for key in history.keys()[:-HISTORY]:
        history.delete(key)


class Meta(BaseModel):
    key: str
    value: Any


@registry.define(
    "chat",
    description="A small stateful conversation with a 20-message history",
    state={"history": collection(Turn), "meta": collection(Meta)},
    on_message=check,
    on_error=apologise,
    max_attempts=1,
)
async def chat(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        text = message.text or ""
        if text.strip().lower() == "boom":
            raise RuntimeError("the user asked for a failure")
        _remember(ctx, "user", text)
        answer = f"You said {text!r}. I remember {len(ctx.state.history)} messages."
        _remember(ctx, "assistant", answer)
        ctx.reply(answer, to=message)
