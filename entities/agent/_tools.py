"""Tools: a name, a description, a pydantic model of the arguments, and a function.

Arguments are validated before the function runs; invalid arguments and exceptions come back as a
:class:`ToolResult` with ``error`` set (for the model to read), never as a crash of the caller.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_type_hints, overload

from pydantic import BaseModel, ValidationError, create_model

__all__ = ["Tool", "ToolResult", "tool"]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The outcome of one tool call."""

    name: str
    arguments: Any
    result: Any = None
    error: str | None = None
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arguments": self.arguments,
            "result": self.result,
            "error": self.error,
            "duration_ms": self.duration_ms,
        }


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool: ``execute`` receives the validated arguments model (sync or async)."""

    name: str
    description: str
    parameters: type[BaseModel]
    execute: Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]
    # a person approves each call first (``True``), or the calls whose arguments it holds true
    requires_approval: bool | Callable[[Any], bool] = False
    approval_timeout: float | None = None  # seconds: a call still waiting then is denied

    def needs_approval(self, arguments: Any) -> bool:
        """Whether a call with ``arguments`` waits for a person's approval. A predicate that
        raises counts as ``True`` (the safe side)."""
        if callable(self.requires_approval):
            try:
                return bool(self.requires_approval(arguments))
            except Exception:
                return True
        return bool(self.requires_approval)

    def json_schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments (what providers are given)."""
        return self.parameters.model_json_schema()

    async def call(self, arguments: Any) -> ToolResult:
        """Validate ``arguments`` and run the tool; errors are returned, not raised."""
        started = time.perf_counter()
        try:
            args = self.parameters.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            return ToolResult(
                self.name,
                arguments,
                error=f"invalid arguments: {problems}",
                duration_ms=_ms(started),
            )
        try:
            result = self.execute(args)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # the model reads the error and can try something else
            return ToolResult(
                self.name, arguments, error=f"{type(exc).__name__}: {exc}", duration_ms=_ms(started)
            )
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json")
        return ToolResult(self.name, arguments, result=result, duration_ms=_ms(started))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    requires_approval: bool | Callable[[Any], bool] = False,
    approval_timeout: float | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    requires_approval: bool | Callable[[Any], bool] = False,
    approval_timeout: float | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a :class:`Tool` from a typed function (``@tool`` or ``@tool(name=...)``).

    The parameters model is built from the function's annotated parameters; the description
    defaults to the docstring. ``requires_approval``: each call waits for a person's decision
    (or, given a predicate on the call's arguments, the calls it holds true for); see
    :mod:`entities._approvals`. ``approval_timeout`` (seconds): a call still waiting then is
    denied ("timed out").

    Raises:
        ValueError: ``approval_timeout`` is not a positive number.
    """
    if approval_timeout is not None and not approval_timeout > 0:
        raise ValueError(f"approval_timeout must be positive seconds, not {approval_timeout!r}")

    def build(f: Callable[..., Any]) -> Tool:
        hints = get_type_hints(f)
        fields: dict[str, Any] = {}
        for param in inspect.signature(f).parameters.values():
            annotation = hints.get(param.name, Any)
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (annotation, default)
        model = create_model(f"{f.__name__}_args", **fields)

        def execute(args: BaseModel) -> Any:
            return f(**{k: getattr(args, k) for k in fields})

        return Tool(
            name or f.__name__,
            description or inspect.getdoc(f) or f.__name__,
            model,
            execute,
            requires_approval,
            approval_timeout,
        )

    if fn is not None:
        return build(fn)
    return build
