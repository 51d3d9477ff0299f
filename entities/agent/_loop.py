"""The model loop: model call -> tool calls -> repeat up to ``max_rounds`` -> final text.

Every model response and every tool result is a journaled step of the wake (``ctx.step``), keyed
by the run and round, so a redelivered wake (after a crash or a lost lease) re-uses what was
recorded and calls the model only for what is missing; replay calls nothing at all. Text deltas
are appended to the entity's stream as they arrive (``text_deltas``), the final text is the
entity's reply (``texts``), and each tool call is recorded in ``tool_calls``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .. import _tracing as tracing
from .._approvals import ApprovalPending, approval_id
from .._errors import BudgetExceeded, EntitiesError, ModelError
from .._metrics import metrics
from ._host import AgentContext
from ._limits import model_limits
from ._media import data_url
from ._model import (
    ChatMessage,
    ModelClient,
    ModelResponse,
    ToolCall,
    ToolSpec,
    Usage,
    resolve_model,
)
from ._scripted import ScriptedModel, TestResponses
from ._tools import Tool, ToolResult
from ._window import user_message

__all__ = ["Agent", "AgentConfig", "AgentRunResult"]

logger = logging.getLogger("entities.agent")


@dataclass(slots=True)
class AgentConfig:
    """How ``ctx.use_agent`` configures the loop."""

    system_prompt: str
    model: str | ModelClient = "test:scripted"
    tools: Sequence[Tool] = ()
    max_rounds: int = 8
    temperature: float | None = None
    max_tokens: int = 4096
    test_responses: TestResponses | None = None
    get_api_key: Callable[[str], str | None] | None = None
    history: int = 20  # timeline messages sent with each run (the last N)


@dataclass(slots=True)
class AgentRunResult:
    """What ``await ctx.agent.run()`` returns."""

    success: bool
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    rounds: int = 0


class Agent:
    """The agent bound to one wake (``ctx.agent``)."""

    def __init__(self, ctx: AgentContext, config: AgentConfig) -> None:
        if config.max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        names = [t.name for t in config.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        self.ctx = ctx
        self.config = config
        self._tools = {t.name: t for t in config.tools}
        self._client: ModelClient | None = None
        self._runs = 0

    def client(self) -> ModelClient:
        """The model client (the scripted model when ``test_responses`` is set).

        Raises:
            ModelError: see :func:`resolve_model`.
        """
        if self._client is None:
            if self.config.test_responses is not None:
                self._client = ScriptedModel(
                    self.config.test_responses, runs_before=self.ctx.runs_before
                )
            elif self.config.model == "test:scripted":
                raise ModelError("the test model needs test_responses")
            else:
                self._client = resolve_model(self.config.model, get_api_key=self.config.get_api_key)
        return self._client

    async def run(self, input: str | None = None, *, reply: bool = True) -> AgentRunResult:
        """Run the loop once: with ``input`` as the user's message, or else on the timeline
        (the entity's recent inbox and replies, this wake's messages included).

        With ``reply`` (the default) the final text is the entity's reply to the message being
        handled. Failures (model errors, too many rounds) are returned, not raised.
        """
        ctx = self.ctx
        self._runs += 1
        run_key = f"{ctx.run_id}.agent{self._runs}"
        messages = list(await ctx.timeline_messages(last=self.config.history))
        if input is not None:
            messages.append(ChatMessage(role="user", content=input))
        if any(m.attachments for m in messages):
            messages = [await self._with_content(m) for m in messages]
        system = await self._system_prompt()
        specs = [ToolSpec(t.name, t.description, t.json_schema()) for t in self.config.tools]
        record = ctx.record_run()
        usage = Usage()
        calls: list[dict[str, Any]] = []
        text = ""
        steered: list[dict[str, Any]] = []
        try:
            for round_ in range(self.config.max_rounds):
                for message in await self._steering(f"{run_key}.steer{round_}"):
                    steered.append(message)
                    messages.append(await self._with_content(user_message(message)))
                step = f"{run_key}.model{round_}"
                response = await self._model_call(step, system, messages, specs)
                usage = usage + response.usage
                if response.reasoning:
                    ctx._emit(
                        "reasoning",
                        f"{run_key}.{round_}",
                        {"run_id": ctx.run_id, "round": round_, "step": step,
                         "text": response.reasoning},
                        "insert",
                    )  # fmt: skip
                messages.append(
                    ChatMessage(
                        role="assistant",
                        content=response.text,
                        tool_calls=response.tool_calls,
                        reasoning=response.reasoning,
                        reasoning_signature=response.reasoning_signature,
                    )
                )
                if not response.tool_calls:
                    text = response.text
                    break
                decided = self._approvals(round_, response.tool_calls)
                for call in response.tool_calls:
                    step = f"{run_key}.tool{round_}.{call.id}"
                    result = await self._tool_call(step, call, decided.get(call.id))
                    calls.append(result)
                    ctx._emit(
                        "tool_calls",
                        f"{run_key}.{round_}.{call.id}",
                        dict(result, run_id=ctx.run_id, round=round_, call_id=call.id),
                        "insert",
                    )
                    content = result["error"] if result["error"] else _as_text(result["result"])
                    messages.append(
                        ChatMessage(
                            role="tool",
                            content=content,
                            tool_call_id=call.id,
                            name=call.name,
                            is_error=result["error"] is not None,
                        )
                    )
            else:
                error = f"no final answer within max_rounds={self.config.max_rounds}"
                record.end("failed", finish_reason="max_rounds", usage=_pair(usage), error=error)
                return AgentRunResult(False, text, calls, usage, error, self.config.max_rounds)
        except BudgetExceeded as exc:
            metrics.budget_refusals.inc((ctx.entity_type,))
            logger.info("%s: %s", ctx.run_id, exc)
            record.end("failed", finish_reason="budget", usage=_pair(usage), error=str(exc))
            return AgentRunResult(False, text, calls, usage, str(exc), round_ + 1)
        except ModelError as exc:
            record.end("failed", finish_reason="model_error", usage=_pair(usage), error=str(exc))
            return AgentRunResult(False, text, calls, usage, str(exc), round_ + 1)
        record.attach_response(text)
        record.end("completed", finish_reason="stop", usage=_pair(usage))
        if reply and text:
            ctx.reply(text)
            for message in steered:  # the answer answers the messages that steered it too
                ctx.reply(text, to=message["key"])
        return AgentRunResult(True, text, calls, usage, None, round_ + 1)

    async def _steering(self, step: str) -> list[dict[str, Any]]:
        """The steering messages to add before a model round (journaled under ``step``: a
        re-run takes the same ones), each recorded as taken by this wake."""
        taken: list[dict[str, Any]] = await self.ctx.step(
            step, self.ctx.steering_messages, span=False
        )
        for message in taken:
            self.ctx.took_steering(message)
        return taken

    async def _with_content(self, message: ChatMessage) -> ChatMessage:
        """``message`` with its ``stream`` attachments read into ``data:`` URLs (the models
        cannot fetch them); one that cannot be read keeps no URL (the adapters mention it)."""
        if not any("stream" in a for a in message.attachments):
            return message
        attachments = []
        for attachment in message.attachments:
            if "stream" in attachment and "url" not in attachment:
                try:
                    content = await self.ctx.attachment_bytes(attachment["stream"])
                except EntitiesError as exc:
                    logger.warning("attachment %s not read: %s", attachment["stream"], exc)
                else:
                    mime = str(attachment.get("mime") or "application/octet-stream")
                    attachment = {**attachment, "url": data_url(mime, content)}
            attachments.append(attachment)
        return replace(message, attachments=tuple(attachments))

    async def _system_prompt(self) -> str:
        parts = [self.config.system_prompt]
        composed = await self.ctx.composed_context()
        if composed:
            parts.append(composed)
        return "\n\n".join(p for p in parts if p)

    async def _model_call(
        self, step: str, system: str, messages: list[ChatMessage], specs: list[ToolSpec]
    ) -> ModelResponse:
        ctx = self.ctx
        on_text = _live_deltas(ctx, "text_deltas", step)
        on_reasoning = _live_deltas(ctx, "reasoning_deltas", step)

        async def call() -> dict[str, Any]:
            budget = ctx.budget
            if budget is not None and (why := await budget.check()) is not None:
                raise BudgetExceeded(why, url=ctx.entity_url)
            started = time.perf_counter()
            client = self.client()
            provider = client.name.partition(":")[0]
            extra: dict[str, Any] = {}
            if _takes_reasoning(client):
                extra["on_reasoning"] = on_reasoning
            with tracing.span(
                f"model call {client.name}",
                {"gen_ai.system": provider, "gen_ai.request.model": client.name,
                 "entities.step": step},
            ):  # fmt: skip
                try:
                    async with model_limits.turn(provider):
                        response = await client.complete(
                            system=system,
                            messages=messages,
                            tools=specs,
                            temperature=self.config.temperature,
                            max_tokens=self.config.max_tokens,
                            on_text=on_text,
                            **extra,
                        )
                except Exception:
                    metrics.model_calls.inc((ctx.entity_type, provider, "error"))
                    raise
            metrics.model_calls.inc((ctx.entity_type, provider, "ok"))
            usage = response.usage
            metrics.tokens(ctx.entity_type, provider, usage.input_tokens, usage.output_tokens)
            if budget is not None:
                await budget.record(step, usage.input_tokens, usage.output_tokens)
            data = response.to_json()
            data["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
            return data

        recorded = await ctx.step(step, call)
        return ModelResponse.from_json(recorded)

    def _approvals(self, round_: int, calls: Sequence[ToolCall]) -> dict[str, dict[str, Any]]:
        """The decisions on this round's calls that need approval, by call id.

        Raises:
            ApprovalPending: some have no decision yet: the wake is suspended until a person
                decides (the run goes on from its journal then).
        """
        resume = self.ctx.resumption
        decided: dict[str, dict[str, Any]] = {}
        waiting: list[dict[str, Any]] = []
        for call in calls:
            tool = self._tools.get(call.name)
            if tool is None or not tool.needs_approval(call.arguments):
                continue
            id = approval_id(self.ctx.run_id, self._runs, round_, call.id)
            decision = None if resume is None else resume.decisions.get(id)
            if decision is None:
                waiting.append(
                    {"id": id, "tool": call.name, "arguments": call.arguments,
                     "timeout": tool.approval_timeout}
                )  # fmt: skip
            else:
                decided[call.id] = decision
        if waiting:
            raise ApprovalPending(waiting)
        return decided

    async def _tool_call(
        self, step: str, call: Any, decision: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        tool = self._tools.get(call.name)

        async def run() -> dict[str, Any]:
            if decision is not None and decision.get("status") != "approved":
                who = f" by {decision['by']}" if decision.get("by") else ""
                note = f": {decision['note']}" if decision.get("note") else ""
                return ToolResult(
                    call.name, call.arguments, error=f"not approved{who}{note}"
                ).to_json()
            if tool is None:
                known = ", ".join(sorted(self._tools)) or "none"
                return ToolResult(
                    call.name, call.arguments, error=f"unknown tool {call.name!r} (tools: {known})"
                ).to_json()
            with tracing.span(f"tool call {call.name}", {"entities.step": step}) as span:
                result = (await tool.call(call.arguments)).to_json()
                if span is not None and result.get("error"):
                    span.set_attribute("entities.tool_error", str(result["error"]))
                return result

        result: dict[str, Any] = await self.ctx.step(step, run)
        return result


def _pair(usage: Usage) -> tuple[int, int]:
    return usage.input_tokens, usage.output_tokens


_TAKES_REASONING: dict[type, bool] = {}


def _takes_reasoning(client: ModelClient) -> bool:
    """Whether ``client.complete`` accepts ``on_reasoning`` (cached per client class)."""
    kind = type(client)
    known = _TAKES_REASONING.get(kind)
    if known is None:
        try:
            parameters = inspect.signature(client.complete).parameters
        except (TypeError, ValueError):
            parameters = {}  # type: ignore[assignment]
        known = _TAKES_REASONING[kind] = "on_reasoning" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
    return known


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def _live_deltas(ctx: AgentContext, collection: str, step: str) -> Callable[[str], Awaitable[None]]:
    """A model stream's callback writing each delta live to ``collection`` (rows
    ``{step}.{n}``, numbered from 1)."""
    count = 0

    async def on_delta(delta: str) -> None:
        nonlocal count
        count += 1
        await ctx.append_live(
            collection,
            f"{step}.{count}",
            {"run_id": ctx.run_id, "step": step, "seq": count, "delta": delta},
        )

    return on_delta
