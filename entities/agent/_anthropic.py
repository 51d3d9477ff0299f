"""``anthropic:NAME``: a :class:`ModelClient` over the official ``anthropic`` SDK (async, streamed).

One :meth:`AnthropicModel.complete` is one streamed ``POST /v1/messages``: text deltas go to
``on_text`` as they arrive, ``tool_use`` blocks are assembled from their ``input_json_delta``
partials, and usage and the stop reason come from ``message_start`` / ``message_delta``.

This module is imported lazily (by :func:`~entities.agent.resolve_model`); importing it without
the SDK installed raises :class:`ModelError` naming the extra to install.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._media import mention, parse_data_url
from ._model import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    ChatMessage,
    ModelError,
    ModelResponse,
    SdkModel,
    TextCallback,
    ToolCall,
    ToolSpec,
    Usage,
)

try:
    import anthropic
    from anthropic.types import (
        InputJSONDelta,
        MessageParam,
        RawContentBlockDeltaEvent,
        RawContentBlockStartEvent,
        RawMessageDeltaEvent,
        RawMessageStartEvent,
        RawMessageStopEvent,
        SignatureDelta,
        TextBlock,
        TextDelta,
        ThinkingBlock,
        ThinkingDelta,
        ToolParam,
        ToolUseBlock,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ModelError(
        "install the 'anthropic' extra: pip install 'entities-runtime[anthropic]'"
    ) from exc

__all__ = ["AnthropicModel"]


class AnthropicModel(SdkModel):
    """A :class:`~entities.agent.ModelClient` for the Anthropic Messages API.

    ``name`` is the model id (``claude-...``); :attr:`name` on the instance is
    ``"anthropic:<model id>"``. ``base_url`` overrides the API endpoint (``None``: the SDK's
    default, which honours ``ANTHROPIC_BASE_URL``). ``max_retries`` is the SDK's retry count for
    connection errors, 408/409/429 and 5xx answers (with its backoff). A fresh SDK client is
    opened and closed per call, so one instance can be used from any event loop.

    Raises:
        ModelError: ``api_key`` is empty.
    """

    provider = "anthropic"
    key_env = "ANTHROPIC_API_KEY"

    def __init__(
        self,
        name: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        thinking_budget: int | None = None,
    ) -> None:
        super().__init__(
            name, api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries
        )
        # extended thinking: the model reasons first (up to this many tokens), streamed
        self.thinking_budget = thinking_budget

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
        """One streamed Messages call; text deltas go to ``on_text`` in order as they arrive,
        thinking deltas (with ``thinking_budget``) to ``on_reasoning``.

        ``temperature`` (when not ``None``) is sent as the request's ``temperature`` field via
        the SDK's ``extra_body`` (the SDK's typed parameters no longer carry it); the API decides
        whether the model accepts it.

        Raises:
            ModelError: the history cannot be mapped (a tool result without ``tool_call_id``),
                the API answered an error status or an ``error`` event, the connection failed, or
                the stream ended before ``message_stop``. Exceptions raised by ``on_text``
                propagate unchanged.
        """
        request_messages = to_anthropic_messages(messages)
        if not request_messages:
            raise ModelError("anthropic: the conversation has no messages to send")
        extra_body: dict[str, object] | None = None
        if temperature is not None:
            extra_body = {"temperature": temperature}
        if self.thinking_budget is not None:
            thinking = {"type": "enabled", "budget_tokens": self.thinking_budget}
            extra_body = {**(extra_body or {}), "thinking": thinking}
        state = _StreamState()
        try:
            async with anthropic.AsyncAnthropic(
                api_key=self._api_key,
                base_url=self._base_url,
                timeout=self._timeout,
                max_retries=self._max_retries,
            ) as client:
                stream = await client.messages.create(
                    model=self.model,
                    max_tokens=max_tokens,
                    messages=request_messages,
                    system=system if system else anthropic.omit,
                    tools=to_anthropic_tools(tools) if tools else anthropic.omit,
                    stream=True,
                    extra_body=extra_body,
                )
                async with stream:
                    async for event in stream:
                        await state.feed(event, on_text, on_reasoning)
        except anthropic.APIStatusError as exc:
            detail = exc.api_message or exc.message
            raise ModelError(
                f"anthropic API error (HTTP {exc.status_code}) for model {self.model!r}: {detail}"
            ) from exc
        except anthropic.APIConnectionError as exc:
            raise ModelError(
                f"anthropic API unreachable for model {self.model!r}: {exc.message}"
            ) from exc
        except anthropic.AnthropicError as exc:
            raise ModelError(f"anthropic call for model {self.model!r} failed: {exc}") from exc
        if not state.stopped:
            raise ModelError(f"anthropic stream for model {self.model!r} ended before message_stop")
        return state.response(self.model)


@dataclass
class _PendingToolUse:
    id: str
    name: str
    initial_input: dict[str, object]
    parts: list[str] = field(default_factory=list)

    def to_call(self) -> ToolCall:
        raw = "".join(self.parts)
        if not raw.strip():
            return ToolCall(self.id, self.name, dict(self.initial_input))
        try:
            arguments: Any = json.loads(raw)
        except ValueError:
            arguments = raw  # what the model sent; the loop reports it back as an error
        return ToolCall(self.id, self.name, arguments)


@dataclass
class _StreamState:
    """Accumulates one streamed message from its raw events."""

    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    signature: str | None = None
    tools: dict[int, _PendingToolUse] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    stop_reason: str | None = None
    model: str = ""
    stopped: bool = False

    async def feed(
        self,
        event: object,
        on_text: TextCallback | None,
        on_reasoning: TextCallback | None = None,
    ) -> None:
        if isinstance(event, RawMessageStartEvent):
            usage = event.message.usage
            self.model = event.message.model
            self.input_tokens = _input_tokens(
                usage.input_tokens,
                usage.cache_creation_input_tokens,
                usage.cache_read_input_tokens,
            )
            self.output_tokens = usage.output_tokens
        elif isinstance(event, RawContentBlockStartEvent):
            block = event.content_block
            if isinstance(block, ToolUseBlock):
                self.tools[event.index] = _PendingToolUse(block.id, block.name, dict(block.input))
            elif isinstance(block, TextBlock) and block.text:
                await self._text(block.text, on_text)
            elif isinstance(block, ThinkingBlock):
                if block.thinking:
                    await self._thinking(block.thinking, on_reasoning)
                if block.signature:
                    self.signature = block.signature
        elif isinstance(event, RawContentBlockDeltaEvent):
            delta = event.delta
            if isinstance(delta, TextDelta):
                await self._text(delta.text, on_text)
            elif isinstance(delta, ThinkingDelta):
                await self._thinking(delta.thinking, on_reasoning)
            elif isinstance(delta, SignatureDelta):
                self.signature = (self.signature or "") + delta.signature
            elif isinstance(delta, InputJSONDelta):
                pending = self.tools.get(event.index)
                if pending is None:
                    raise ModelError(
                        f"anthropic stream: input_json_delta for block {event.index}, "
                        "which is not a tool_use block"
                    )
                pending.parts.append(delta.partial_json)
        elif isinstance(event, RawMessageDeltaEvent):
            if event.delta.stop_reason is not None:
                self.stop_reason = event.delta.stop_reason
            delta_usage = event.usage
            self.output_tokens = delta_usage.output_tokens
            if delta_usage.input_tokens is not None:
                self.input_tokens = _input_tokens(
                    delta_usage.input_tokens,
                    delta_usage.cache_creation_input_tokens,
                    delta_usage.cache_read_input_tokens,
                )
        elif isinstance(event, RawMessageStopEvent):
            self.stopped = True

    async def _text(self, text: str, on_text: TextCallback | None) -> None:
        if not text:
            return
        self.text.append(text)
        if on_text is not None:
            await on_text(text)

    async def _thinking(self, text: str, on_reasoning: TextCallback | None) -> None:
        if not text:
            return
        self.thinking.append(text)
        if on_reasoning is not None:
            await on_reasoning(text)

    def response(self, requested_model: str) -> ModelResponse:
        calls = tuple(self.tools[i].to_call() for i in sorted(self.tools))
        return ModelResponse(
            text="".join(self.text),
            tool_calls=calls,
            usage=Usage(self.input_tokens, self.output_tokens),
            stop_reason=self.stop_reason or ("tool_use" if calls else "end_turn"),
            model=self.model or requested_model,
            reasoning="".join(self.thinking),
            reasoning_signature=self.signature,
        )


def _input_tokens(base: int, cache_creation: int | None, cache_read: int | None) -> int:
    """All input tokens: uncached plus cache writes plus cache reads."""
    return base + (cache_creation or 0) + (cache_read or 0)


def anthropic_attachment(attachment: Mapping[str, Any]) -> dict[str, Any]:
    """An attachment as a content block: ``image`` (by URL or inline), ``document`` for PDFs
    (by URL or inline) and plain text (inline), else a text block mentioning it."""
    url = str(attachment.get("url") or "")
    mime = str(attachment.get("mime") or "")
    if not url:  # a stream that could not be read
        return {"type": "text", "text": mention(attachment, "its content could not be read")}
    inline = parse_data_url(url, mime)
    kind = attachment.get("type")
    source: dict[str, Any]
    if kind == "image" or (kind == "file" and mime.startswith("image/")):
        if inline is not None:
            source = {"type": "base64", "media_type": inline.mime, "data": inline.base64}
        else:
            source = {"type": "url", "url": url}
        return {"type": "image", "source": source}
    if kind == "file" and mime == "application/pdf":
        if inline is not None:
            source = {"type": "base64", "media_type": "application/pdf", "data": inline.base64}
        else:
            source = {"type": "url", "url": url}
        return {"type": "document", "source": source, "title": attachment.get("name")}
    if kind == "file" and mime.startswith("text/") and inline is not None:
        source = {"type": "text", "media_type": "text/plain", "data": inline.text()}
        return {"type": "document", "source": source, "title": attachment.get("name")}
    return {"type": "text", "text": mention(attachment, "not readable by this model")}


def to_anthropic_tools(tools: Sequence[ToolSpec]) -> list[ToolParam]:
    """Anthropic tool definitions (``name``, ``description``, ``input_schema``)."""
    result: list[ToolParam] = []
    for spec in tools:
        schema: dict[str, object] = dict(spec.parameters) or {"type": "object", "properties": {}}
        result.append({"name": spec.name, "description": spec.description, "input_schema": schema})
    return result


def to_anthropic_messages(messages: Sequence[ChatMessage]) -> list[MessageParam]:
    """The history as Anthropic messages.

    Assistant turns carry a text block (when non-empty) then their ``tool_use`` blocks; ``tool``
    messages become ``tool_result`` blocks (``is_error`` kept) in a user turn. Consecutive items
    of the same role are merged into one turn, as the API wants strictly alternating roles, and
    empty messages are dropped (the API rejects empty text blocks). Tool call arguments that are
    not a JSON object (the model sent something unparseable) are sent back as ``{"raw": ...}``.

    Raises:
        ModelError: a ``tool`` message has no ``tool_call_id``.
    """
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for message in messages:
        blocks: list[dict[str, Any]] = []
        role = "assistant" if message.role == "assistant" else "user"
        if message.role == "tool":
            if not message.tool_call_id:
                raise ModelError(f"a tool result ({message.name!r}) has no tool_call_id")
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id,
                "is_error": message.is_error,
            }
            if message.content:
                block["content"] = message.content
            blocks.append(block)
        else:
            if message.role == "assistant" and message.reasoning_signature:
                blocks.append(
                    {
                        "type": "thinking",
                        "thinking": message.reasoning,
                        "signature": message.reasoning_signature,
                    }
                )
            for attachment in message.attachments if message.role == "user" else ():
                blocks.append(anthropic_attachment(attachment))
            if message.content:
                blocks.append({"type": "text", "text": message.content})
            if message.role == "assistant":
                for call in message.tool_calls:
                    arguments = call.arguments
                    if not isinstance(arguments, dict):
                        arguments = {"raw": arguments}
                    blocks.append(
                        {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}
                    )
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            previous = turns[-1][1]
            # tool results must come first in a user turn
            if role == "user" and blocks[0]["type"] == "tool_result":
                at = sum(1 for b in previous if b["type"] == "tool_result")
                previous[at:at] = blocks
            else:
                previous.extend(blocks)
        else:
            turns.append((role, blocks))
    result: list[Any] = [{"role": role, "content": blocks} for role, blocks in turns]
    return result
