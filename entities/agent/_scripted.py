"""The scripted test model: canned replies with no key and no network.

``test_responses`` is either a list (indexed by the entity's number of prior runs, so repeated
wakes are deterministic; each item is the final text, or a list of per-round items for runs that
call tools) or a function ``fn(request) -> str | ModelResponse`` called for every model round.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._model import ChatMessage, ModelError, ModelResponse, TextCallback, ToolCall, ToolSpec, Usage

__all__ = ["ScriptRequest", "ScriptedModel", "TestResponses"]

TestResponses = Sequence[Any] | Callable[["ScriptRequest"], Any]


@dataclass(frozen=True, slots=True)
class ScriptRequest:
    """What a scripted function sees for one model round."""

    system: str
    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec]
    round: int
    runs_before: int

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return ""

    @property
    def tool_results(self) -> list[ChatMessage]:
        """The tool results since the last user message."""
        out: list[ChatMessage] = []
        for message in reversed(self.messages):
            if message.role == "user":
                break
            if message.role == "tool":
                out.append(message)
        return list(reversed(out))


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


class ScriptedModel:
    """A :class:`ModelClient` that plays back ``test_responses``."""

    def __init__(self, responses: TestResponses, *, runs_before: int = 0) -> None:
        self.name = "test:scripted"
        self.responses = responses
        self.runs_before = runs_before
        self.calls = 0

    async def complete(
        self,
        *,
        system: str,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec],
        temperature: float | None = None,
        max_tokens: int = 4096,
        on_text: TextCallback | None = None,
        on_reasoning: TextCallback | None = None,
    ) -> ModelResponse:
        round_ = sum(1 for m in messages if m.role == "assistant" and m.tool_calls)
        request = ScriptRequest(system, messages, tools, round_, self.runs_before)
        self.calls += 1
        item = self._item(request)
        if inspect.isawaitable(item):
            item = await item
        response = _coerce(item, round_)
        if on_reasoning is not None and response.reasoning:
            for chunk in _chunks(response.reasoning):
                await on_reasoning(chunk)
        if on_text is not None and response.text:
            for chunk in _chunks(response.text):
                await on_text(chunk)
        prompt = system + "".join(m.content for m in messages)
        return ModelResponse(
            response.text,
            response.tool_calls,
            Usage(_estimate_tokens(prompt), _estimate_tokens(response.text)),
            "tool_use" if response.tool_calls else "end_turn",
            self.name,
            response.reasoning,
        )

    def _item(self, request: ScriptRequest) -> Any:
        if callable(self.responses):
            return self.responses(request)
        if not self.responses:
            raise ModelError("test_responses is empty")
        run = self.responses[min(request.runs_before, len(self.responses) - 1)]
        if isinstance(run, list | tuple):
            if not run:
                raise ModelError("a scripted run has no rounds")
            return run[min(request.round, len(run) - 1)]
        return run


def _coerce(item: Any, round_: int) -> ModelResponse:
    if isinstance(item, ModelResponse):
        return item
    if isinstance(item, str):
        return ModelResponse(text=item)
    if isinstance(item, dict) and "tool_calls" in item:
        calls = tuple(
            ToolCall(c.get("id") or f"call_{round_}_{i}", c["name"], c.get("arguments", {}))
            for i, c in enumerate(item["tool_calls"])
        )
        return ModelResponse(text=item.get("text", ""), tool_calls=calls)
    raise ModelError(f"a scripted response must be text, a ModelResponse or a dict, not {item!r}")


def _chunks(text: str) -> list[str]:
    """Split text into word-sized deltas (a stream, as a provider would send it)."""
    out: list[str] = []
    current = ""
    for ch in text:
        current += ch
        if ch == " ":
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out
