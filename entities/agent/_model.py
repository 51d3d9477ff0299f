"""The model interface the agent loop talks to, and how ``provider:name`` strings resolve.

A :class:`ModelClient` takes the system prompt, the conversation as :class:`ChatMessage` items
and the tools, streams text deltas to ``on_text`` as they arrive, and returns a
:class:`ModelResponse` (final text, tool calls, usage). Adapters for the official ``anthropic``
and ``openai`` SDKs live in ``_anthropic.py`` / ``_openai.py`` (imported lazily: they are optional
extras); :class:`ScriptedModel` is the test model.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from .._errors import ModelError

__all__ = [
    "ChatMessage",
    "ModelClient",
    "ModelError",
    "ModelResponse",
    "SdkModel",
    "TextCallback",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "resolve_model",
]

TextCallback = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as a model sees it."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call the model asked for."""

    id: str
    name: str
    arguments: Any  # normally a dict; whatever the model sent when it is not valid JSON

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One conversation item, provider-neutral.

    ``role="assistant"`` may carry ``tool_calls``; ``role="tool"`` answers one call
    (``tool_call_id``, ``name``, ``content`` = the result or error as text).
    """

    role: Literal["user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool = False
    # an assistant turn's reasoning, with the provider's signature of it (Anthropic wants the
    # signed thinking of a tool-use turn sent back with it)
    reasoning: str = ""
    reasoning_signature: str | None = None
    # a user turn's attachments (entities.Attachment rows as JSON: type, name, mime, url)
    attachments: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "role": self.role,
            "content": self.content,
            "tool_calls": [c.to_json() for c in self.tool_calls],
            "tool_call_id": self.tool_call_id,
            "name": self.name,
            "is_error": self.is_error,
        }
        if self.reasoning:
            data["reasoning"] = self.reasoning
            data["reasoning_signature"] = self.reasoning_signature
        if self.attachments:
            data["attachments"] = list(self.attachments)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChatMessage:
        return cls(
            role=data["role"],
            content=data.get("content") or "",
            tool_calls=tuple(ToolCall(**c) for c in data.get("tool_calls") or ()),
            tool_call_id=data.get("tool_call_id"),
            name=data.get("name"),
            is_error=bool(data.get("is_error")),
            reasoning=data.get("reasoning") or "",
            reasoning_signature=data.get("reasoning_signature"),
            attachments=tuple(data.get("attachments") or ()),
        )


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """What one model call produced."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = field(default_factory=Usage)
    stop_reason: str = "end_turn"
    model: str = ""
    reasoning: str = ""  # what the model streamed of its reasoning (thinking, summaries)
    reasoning_signature: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "text": self.text,
            "tool_calls": [c.to_json() for c in self.tool_calls],
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens,
            },
            "stop_reason": self.stop_reason,
            "model": self.model,
        }
        if self.reasoning:
            data["reasoning"] = self.reasoning
            data["reasoning_signature"] = self.reasoning_signature
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelResponse:
        usage = data.get("usage") or {}
        return cls(
            text=data.get("text") or "",
            tool_calls=tuple(ToolCall(**c) for c in data.get("tool_calls") or ()),
            usage=Usage(int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))),
            stop_reason=data.get("stop_reason") or "end_turn",
            model=data.get("model") or "",
            reasoning=data.get("reasoning") or "",
            reasoning_signature=data.get("reasoning_signature"),
        )


DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RETRIES = 2


class SdkModel:
    """What the SDK-backed clients share: the model id, the key, the endpoint and the SDK's
    timeout and retries. Subclasses set ``provider`` and ``key_env`` and implement ``complete``.

    Raises:
        ModelError: ``api_key`` is empty.
    """

    provider: ClassVar[str] = ""
    key_env: ClassVar[str] = ""

    def __init__(
        self,
        name: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        if not api_key:
            raise ModelError(f"an API key is required for {self.provider}: (set {self.key_env})")
        self.model = name
        self.name = f"{self.provider}:{name}"
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._max_retries = max_retries

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r}, base_url={self._base_url!r})"


class ModelClient(Protocol):
    """What the agent loop needs from a model.

    A client that streams reasoning also accepts ``on_reasoning`` (a :data:`TextCallback`,
    like ``on_text``) in :meth:`complete`; the loop passes it to clients whose ``complete``
    takes it, so clients written without it keep working.
    """

    name: str

    async def complete(
        self,
        *,
        system: str,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec],
        temperature: float | None = None,
        max_tokens: int = 4096,
        on_text: TextCallback | None = None,
    ) -> ModelResponse:
        """One model call; stream text deltas to ``on_text``.

        Raises:
            ModelError: the provider failed or answered something unusable.
        """
        ...


# provider -> (module, class) of its client; the key and base URL come from {PROVIDER}_API_KEY
# and {PROVIDER}_BASE_URL
_PROVIDERS = {
    "anthropic": ("._anthropic", "AnthropicModel"),
    "openai": ("._openai", "OpenAIModel"),
}


def resolve_model(
    model: str | ModelClient,
    *,
    get_api_key: Callable[[str], str | None] | None = None,
) -> ModelClient:
    """A client for ``provider:name`` (``anthropic:...``, ``openai:...``) or a client as is.

    The API key comes from ``get_api_key(provider)`` or the environment
    (``ANTHROPIC_API_KEY``, ``OPENAI_API_KEY``); ``ANTHROPIC_BASE_URL`` / ``OPENAI_BASE_URL``
    point the SDKs elsewhere (a proxy, or a local fake in tests).

    Raises:
        ModelError: unknown provider, a missing SDK (names the extra to install) or a missing key.
    """
    if not isinstance(model, str):
        return model
    provider, _, name = model.partition(":")
    if not name:
        raise ModelError(f"models are addressed as provider:name, got {model!r}")
    client = _PROVIDERS.get(provider)
    if client is None:
        raise ModelError(f"unknown model provider {provider!r}: use anthropic: or openai:")
    module, class_name = client
    env = provider.upper()
    key = (get_api_key(provider) if get_api_key else None) or os.environ.get(f"{env}_API_KEY")
    if not key:
        raise ModelError(f"set {env}_API_KEY (or pass get_api_key) to use {provider}:")
    # imported on use: each provider's SDK is an optional extra
    sdk_client = getattr(importlib.import_module(module, __package__), class_name)
    base_url = os.environ.get(f"{env}_BASE_URL")
    resolved: ModelClient = sdk_client(name, api_key=key, base_url=base_url)
    return resolved
