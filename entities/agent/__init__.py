"""Agents: the model loop (``ctx.use_agent(...)`` / ``await ctx.agent.run()``), tools, model
clients (``anthropic:``, ``openai:`` through the official SDKs, and the scripted test model),
context composition, and ``runtime_tools`` (send, spawn and schedules as host tools)."""

from __future__ import annotations

from ._limits import ModelLimit as ModelLimit
from ._limits import limit_models as limit_models
from ._loop import Agent as Agent
from ._loop import AgentConfig as AgentConfig
from ._loop import AgentRunResult as AgentRunResult
from ._model import ChatMessage as ChatMessage
from ._model import ModelClient as ModelClient
from ._model import ModelError as ModelError
from ._model import ModelResponse as ModelResponse
from ._model import ToolCall as ToolCall
from ._model import ToolSpec as ToolSpec
from ._model import Usage as Usage
from ._model import resolve_model as resolve_model
from ._runtime_tools import runtime_tools as runtime_tools
from ._scripted import ScriptedModel as ScriptedModel
from ._scripted import ScriptRequest as ScriptRequest
from ._tools import Tool as Tool
from ._tools import ToolResult as ToolResult
from ._tools import tool as tool
from ._window import ContextSource as ContextSource
from ._window import estimate_tokens as estimate_tokens

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentRunResult",
    "ChatMessage",
    "ContextSource",
    "ModelClient",
    "ModelError",
    "ModelLimit",
    "ModelResponse",
    "ScriptRequest",
    "ScriptedModel",
    "Tool",
    "ToolCall",
    "ToolResult",
    "ToolSpec",
    "Usage",
    "estimate_tokens",
    "limit_models",
    "resolve_model",
    "runtime_tools",
    "tool",
]
