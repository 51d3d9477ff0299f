"""Context composition: the timeline as model messages, durable context entries, and
``use_context`` source budgets with cache tiers."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .._errors import ContextError
from ._model import ChatMessage, ToolCall

__all__ = [
    "ContextSource",
    "check_sources",
    "compose",
    "estimate_tokens",
    "payload_text",
    "timeline",
    "truncate_tokens",
    "user_message",
]

Tier = Literal["pinned", "stable", "slow-changing", "volatile"]
TIERS: tuple[Tier, ...] = ("pinned", "stable", "slow-changing", "volatile")


def estimate_tokens(text: str) -> int:
    """A quick token estimate (about four characters per token)."""
    return math.ceil(len(text) / 4)


def truncate_tokens(text: str, budget: int) -> str:
    """``text`` cut to about ``budget`` tokens, with a marker when cut."""
    if estimate_tokens(text) <= budget:
        return text
    keep = max(0, budget * 4 - 16)
    return text[:keep] + "\n…(truncated)"


@dataclass(frozen=True, slots=True)
class ContextSource:
    """One ``use_context`` source: content (text, messages, or a function returning either),
    its token ``max`` and cache tier."""

    content: Any
    max: int | None = None
    cache: Tier = "volatile"


def check_sources(budget: int, sources: Mapping[str, ContextSource]) -> None:
    """Validate a ``use_context`` declaration.

    Raises:
        ContextError: an unknown tier, a missing ``max`` on a non-volatile source, or
            non-volatile maxima adding up to more than the budget.
    """
    fixed = 0
    for name, source in sources.items():
        if source.cache not in TIERS:
            raise ContextError(f"context source {name!r}: unknown cache tier {source.cache!r}")
        if source.cache != "volatile":
            if source.max is None:
                raise ContextError(f"context source {name!r} needs a max (it is not volatile)")
            fixed += source.max
    if fixed > budget:
        raise ContextError(f"context sources need {fixed} tokens but the budget is {budget}")


async def compose(budget: int, sources: Mapping[str, ContextSource]) -> str:
    """Assemble sources in tier order (pinned, stable, slow-changing, volatile), each cut to its
    ``max``; volatile sources share what the others left of ``budget``."""
    rendered: dict[str, str] = {}
    for name, source in sources.items():
        value = source.content() if callable(source.content) else source.content
        if inspect.isawaitable(value):
            value = await value
        rendered[name] = _render(value)
    parts: list[str] = []
    used = 0
    volatile = [n for n, s in sources.items() if s.cache == "volatile"]
    for tier in TIERS[:-1]:
        for name, source in sources.items():
            if source.cache == tier:
                text = truncate_tokens(rendered[name], source.max or 0)
                used += estimate_tokens(text)
                parts.append(f'<context source="{name}">\n{text}\n</context>')
    left = max(0, budget - used)
    for name in volatile:
        share = left // max(1, len(volatile))
        limit = sources[name].max
        cap = share if limit is None else min(share, limit)
        text = truncate_tokens(rendered[name], cap)
        parts.append(f'<context source="{name}">\n{text}\n</context>')
    return "\n".join(parts)


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        lines = []
        for item in value:
            if isinstance(item, ChatMessage):
                lines.append(f"{item.role}: {item.content}")
            elif isinstance(item, Mapping):
                when = f"[{item['timestamp']}] " if "timestamp" in item else ""
                lines.append(f"{when}{item.get('role', 'note')}: {item.get('content', '')}")
            else:
                lines.append(str(item))
        return "\n".join(lines)
    return orjson.dumps(value).decode()


def payload_text(payload: Any) -> str:
    """How an inbox payload reads to a model: its ``text``, or compact JSON."""
    if isinstance(payload, Mapping) and isinstance(payload.get("text"), str):
        return str(payload["text"])
    if isinstance(payload, str):
        return payload
    return orjson.dumps(payload).decode()


def user_message(value: Mapping[str, Any]) -> ChatMessage:
    """The user turn of an inbox row: its payload's text and its attachments."""
    return ChatMessage(
        role="user",
        content=payload_text(value.get("payload")),
        attachments=tuple(value.get("attachments") or ()),
    )


_CANCELLED = ChatMessage(role="user", content="")  # a placeholder, dropped at the end


def timeline(
    events: Sequence[Mapping[str, Any]],
    *,
    since: str | None = None,
    last: int | None = None,
) -> list[ChatMessage]:
    """Project stream events into model messages: inbox -> user, replies -> assistant, and each
    agent round's tool calls with their results."""
    out: list[ChatMessage] = []
    users: dict[Any, int] = {}  # inbox key -> its place in ``out``
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    round_of: tuple[Any, Any] | None = None

    def flush_round() -> None:
        if calls:
            out.append(ChatMessage(role="assistant", tool_calls=tuple(calls)))
            out.extend(results)
        calls.clear()
        results.clear()

    for e in events:
        if since is not None and str(e.get("offset", "")) <= since:
            continue
        value = e.get("value") or {}
        type_ = e.get("type")
        if type_ == "tool_calls" and value.get("call_id"):
            this_round = (value.get("run_id"), value.get("round"))
            if this_round != round_of:
                flush_round()
                round_of = this_round
            calls.append(ToolCall(value["call_id"], value.get("name", ""), value.get("arguments")))
            error = value.get("error")
            content = error if error else payload_text(value.get("result"))
            results.append(
                ChatMessage(
                    role="tool",
                    content=content,
                    tool_call_id=value["call_id"],
                    name=value.get("name"),
                    is_error=bool(error),
                )
            )
            continue
        flush_round()
        round_of = None
        if type_ == "inbox":
            operation = (e.get("headers") or {}).get("operation")
            key = e.get("key")
            if operation in ("update", "delete") and key in users:
                at = users.pop(key)  # an edit or a cancel of a message still queued then
                if operation == "update":
                    out[at] = user_message(value)
                    users[key] = at
                else:
                    out[at] = _CANCELLED
                continue
            users[key] = len(out)
            out.append(user_message(value))
        elif type_ == "texts" and value.get("value") is not None:
            out.append(ChatMessage(role="assistant", content=payload_text(value.get("value"))))
    flush_round()
    out = [m for m in out if m is not _CANCELLED]
    if last is not None:
        out = out[-last:] if last > 0 else []
    while out and out[0].role != "user":  # a window starts with the user's turn
        out.pop(0)
    return out
