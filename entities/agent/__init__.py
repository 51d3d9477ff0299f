"""Agents: tools (and, with later issues, the model loop). ``runtime_tools`` are the host tools
an agent gets for the runtime's own coordination: send, spawn and schedules."""

from __future__ import annotations

from ._runtime_tools import runtime_tools as runtime_tools
from ._tools import Tool as Tool
from ._tools import ToolResult as ToolResult
from ._tools import tool as tool

__all__ = ["Tool", "ToolResult", "runtime_tools", "tool"]
