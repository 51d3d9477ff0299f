"""What the agent loop and its host tools need from the wake they run in.

The loop lives below :class:`~entities.HandlerContext` (which builds it in ``ctx.use_agent``),
so it names what it uses as protocols instead of importing the context: a wake's run record,
its journal and live output, its replies and timeline, and, for the host tools, its sends,
spawns and schedules. ``HandlerContext`` provides all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from streams import Operation

from .._approvals import Resumption
from .._budgets import BudgetGate
from .._manifest import ScheduleEntry
from ._model import ChatMessage

__all__ = ["AgentContext", "RunRecord", "SpawnedEntity", "ToolContext"]


class RunRecord(Protocol):
    """A run recorded in the wake (``ctx.record_run()``)."""

    def attach_response(self, text: str) -> None: ...

    def end(
        self,
        status: str = "completed",
        finish_reason: str | None = None,
        *,
        usage: tuple[int, int] | None = None,
        error: str | None = None,
    ) -> None: ...


class AgentContext(Protocol):
    """What :class:`~entities.agent.Agent` uses of its wake."""

    entity_type: str
    entity_url: str
    resumption: Resumption | None  # a run suspended for approvals going on
    budget: BudgetGate | None  # the type's token budget, if it has one

    @property
    def run_id(self) -> str: ...

    @property
    def runs_before(self) -> int: ...

    async def step(self, id: str, fn: Callable[[], Any], *, span: bool = True) -> Any: ...

    async def append_live(
        self, collection: str, key: str, value: Any, operation: Operation = "insert"
    ) -> None: ...

    def record_run(self) -> RunRecord: ...

    def reply(self, message: Any, *, to: Any = None) -> None: ...

    async def timeline_messages(
        self, *, since: str | None = None, last: int | None = None
    ) -> Sequence[ChatMessage]: ...

    async def composed_context(self) -> str: ...

    async def steering_messages(self) -> list[dict[str, Any]]: ...

    def took_steering(self, message: Any) -> None: ...

    async def attachment_bytes(self, stream: str) -> bytes: ...

    def _emit(
        self, type_: str, key: str, value: Any, operation: Operation, old: Any = None
    ) -> None: ...


class SpawnedEntity(Protocol):
    """A handle on an entity spawned by a tool."""

    @property
    def url(self) -> str: ...


class ToolContext(Protocol):
    """What the host tools (``ctx.runtime_tools``) use of their wake."""

    async def send(
        self, url: str, payload: Any, *, type: str | None = None, after_ms: int | None = None
    ) -> str: ...

    async def spawn(
        self, type: str, id: str, *, args: Any = None, initial_message: Any = None
    ) -> SpawnedEntity: ...

    def list_schedules(self) -> list[ScheduleEntry]: ...

    def schedule_cron(
        self, id: str, expression: str, *, payload: Any = None, timezone: str = "UTC"
    ) -> ScheduleEntry: ...

    def cancel_schedule(self, id: str) -> bool: ...
