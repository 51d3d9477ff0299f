"""``openai:NAME``: a :class:`ModelClient` over the official ``openai`` SDK (async, streaming).

One :meth:`OpenAIModel.complete` is one streamed Chat Completions call
(``stream=True, stream_options={"include_usage": True}``): content deltas go to ``on_text`` as
they arrive, tool calls are assembled from their per-``index`` deltas, and usage comes from the
final usage chunk.

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
    import openai
    from openai.types.chat import (
        ChatCompletionChunk,
        ChatCompletionFunctionToolParam,
        ChatCompletionMessageParam,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ModelError("install the 'openai' extra: pip install 'entities-runtime[openai]'") from exc

__all__ = ["OpenAIModel"]


# Chat Completions finish reasons in the provider-neutral (Anthropic-style) vocabulary.
_STOP_REASONS = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
    "content_filter": "refusal",
}


class OpenAIModel(SdkModel):
    """A :class:`~entities.agent.ModelClient` for the OpenAI Chat Completions API.

    ``name`` is the model id; :attr:`name` on the instance is ``"openai:<model id>"``.
    ``base_url`` overrides the API endpoint (``None``: the SDK's default, which honours
    ``OPENAI_BASE_URL``; it includes the ``/v1`` prefix). ``max_retries`` is the SDK's retry
    count for connection errors, 408/409/429 and 5xx answers. A fresh SDK client is opened and
    closed per call, so one instance can be used from any event loop.

    Raises:
        ModelError: ``api_key`` is empty.
    """

    provider = "openai"
    key_env = "OPENAI_API_KEY"

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
        """One streamed Chat Completions call; content deltas go to ``on_text`` in order,
        reasoning deltas (``reasoning_content`` or ``reasoning`` in a chunk's delta, as
        reasoning models behind OpenAI-compatible endpoints stream them) to ``on_reasoning``.

        ``max_tokens`` is sent as ``max_completion_tokens``. The finish reason is reported in
        the neutral vocabulary: ``stop`` -> ``end_turn``, ``tool_calls`` -> ``tool_use``,
        ``length`` -> ``max_tokens``, ``content_filter`` -> ``refusal``.

        Raises:
            ModelError: the history cannot be mapped (a tool result without ``tool_call_id``),
                the API answered an error status or an error chunk, the connection failed, or
                the stream ended without a finish reason. Exceptions raised by ``on_text``
                propagate unchanged.
        """
        request_messages = to_openai_messages(system, messages)
        state = _StreamState()
        try:
            async with openai.AsyncOpenAI(
                api_key=self._api_key,
                base_url=self._base_url,
                timeout=self._timeout,
                max_retries=self._max_retries,
            ) as client:
                stream = await client.chat.completions.create(
                    model=self.model,
                    messages=request_messages,
                    tools=to_openai_tools(tools) if tools else openai.omit,
                    temperature=temperature if temperature is not None else openai.omit,
                    max_completion_tokens=max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async with stream:
                    async for chunk in stream:
                        await state.feed(chunk, on_text, on_reasoning)
        except openai.APIStatusError as exc:
            raise ModelError(
                f"openai API error (HTTP {exc.status_code}) for model {self.model!r}: "
                f"{_status_detail(exc)}"
            ) from exc
        except openai.APIConnectionError as exc:
            raise ModelError(
                f"openai API unreachable for model {self.model!r}: {exc.message}"
            ) from exc
        except openai.OpenAIError as exc:
            raise ModelError(f"openai call for model {self.model!r} failed: {exc}") from exc
        if state.finish_reason is None:
            raise ModelError(
                f"openai stream for model {self.model!r} ended without a finish_reason"
            )
        return state.response(self.model)


def _status_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return exc.message


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)

    def to_call(self) -> ToolCall:
        raw = "".join(self.parts)
        if not raw.strip():
            return ToolCall(self.id, self.name, {})
        try:
            arguments: Any = json.loads(raw)
        except ValueError:
            arguments = raw  # what the model sent; the loop reports it back as an error
        return ToolCall(self.id, self.name, arguments)


@dataclass
class _StreamState:
    """Accumulates one streamed chat completion from its chunks (choice 0)."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, _PendingCall] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    model: str = ""

    async def feed(
        self,
        chunk: ChatCompletionChunk,
        on_text: TextCallback | None,
        on_reasoning: TextCallback | None = None,
    ) -> None:
        if chunk.model:
            self.model = chunk.model
        if chunk.usage is not None:
            self.usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            extra = delta.model_extra or {}
            thought = extra.get("reasoning_content") or extra.get("reasoning")
            if isinstance(thought, str) and thought:
                self.reasoning.append(thought)
                if on_reasoning is not None:
                    await on_reasoning(thought)
            for piece in (delta.content, delta.refusal):
                if piece:
                    self.text.append(piece)
                    if on_text is not None:
                        await on_text(piece)
            for call_delta in delta.tool_calls or ():
                pending = self.calls.setdefault(call_delta.index, _PendingCall())
                if call_delta.id:
                    pending.id = call_delta.id
                function = call_delta.function
                if function is not None:
                    if function.name:
                        pending.name += function.name
                    if function.arguments:
                        pending.parts.append(function.arguments)
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason

    def response(self, requested_model: str) -> ModelResponse:
        calls = tuple(self.calls[i].to_call() for i in sorted(self.calls))
        reason = self.finish_reason or "stop"
        return ModelResponse(
            text="".join(self.text),
            tool_calls=calls,
            usage=self.usage,
            stop_reason=_STOP_REASONS.get(reason, reason),
            model=self.model or requested_model,
            reasoning="".join(self.reasoning),
        )


def to_openai_tools(tools: Sequence[ToolSpec]) -> list[ChatCompletionFunctionToolParam]:
    """Chat Completions function tools (``{"type": "function", "function": {...}}``)."""
    result: list[ChatCompletionFunctionToolParam] = []
    for spec in tools:
        schema: dict[str, object] = dict(spec.parameters) or {"type": "object", "properties": {}}
        result.append(
            {
                "type": "function",
                "function": {
                    "name": spec.name,
                    "description": spec.description,
                    "parameters": schema,
                },
            }
        )
    return result


def to_openai_messages(
    system: str, messages: Sequence[ChatMessage]
) -> list[ChatCompletionMessageParam]:
    """The system prompt (as a leading ``system`` message) and the history as chat messages.

    Assistant turns carry ``tool_calls`` (arguments JSON-encoded; a non-object value the model
    sent unparsed goes back as the string it was); ``tool`` messages answer one call by
    ``tool_call_id``. Chat Completions has no error flag on tool results, so an error result's
    content is prefixed with ``"Error: "``. Empty user / assistant messages are dropped.

    Raises:
        ModelError: a ``tool`` message has no ``tool_call_id``.
    """
    result: list[Any] = []
    if system:
        result.append({"role": "system", "content": system})
    for message in messages:
        if message.role == "tool":
            if not message.tool_call_id:
                raise ModelError(f"a tool result ({message.name!r}) has no tool_call_id")
            content = message.content
            if message.is_error:
                content = f"Error: {content}"
            result.append(
                {"role": "tool", "tool_call_id": message.tool_call_id, "content": content}
            )
        elif message.role == "assistant":
            if not message.content and not message.tool_calls:
                continue
            item: dict[str, Any] = {"role": "assistant", "content": message.content or None}
            if message.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.name,
                            "arguments": call.arguments
                            if isinstance(call.arguments, str)
                            else json.dumps(call.arguments),
                        },
                    }
                    for call in message.tool_calls
                ]
            result.append(item)
        elif message.attachments:
            parts: list[dict[str, Any]] = []
            if message.content:
                parts.append({"type": "text", "text": message.content})
            parts.extend(openai_attachment(a) for a in message.attachments)
            result.append({"role": "user", "content": parts})
        elif message.content:
            result.append({"role": "user", "content": message.content})
    return result


def openai_attachment(attachment: Mapping[str, Any]) -> dict[str, Any]:
    """An attachment as a Chat Completions content part: ``image_url`` (a URL or a ``data:``
    URL), ``file`` (inline PDFs), ``input_audio`` (inline wav or mp3), else a text part
    mentioning it."""
    url = str(attachment.get("url") or "")
    mime = str(attachment.get("mime") or "")
    if not url:  # a stream that could not be read
        return {"type": "text", "text": mention(attachment, "its content could not be read")}
    inline = parse_data_url(url, mime)
    kind = attachment.get("type")
    if kind == "image" or (kind == "file" and mime.startswith("image/")):
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "file" and inline is not None and inline.mime == "application/pdf":
        name = str(attachment.get("name") or "file.pdf")
        return {"type": "file", "file": {"filename": name, "file_data": inline.url()}}
    audio_format = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/mpeg": "mp3"}.get(mime)
    if kind == "audio" and inline is not None and audio_format is not None:
        return {
            "type": "input_audio",
            "input_audio": {"data": inline.base64, "format": audio_format},
        }
    return {"type": "text", "text": mention(attachment, "not readable by this model")}
