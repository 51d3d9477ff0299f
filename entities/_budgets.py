"""Token budgets: at most so many model tokens per entity and per type in a (UTC) day.

A type defined with ``token_budget=TokenBudget(per_entity=..., per_type=...)`` has its agents'
model calls counted in the side table ``tokens``: one row per model call actually made (a
journaled call that a re-run or replay re-uses is not counted again), keyed
``{day}|{type}|{id}|{step}`` (``day`` is ``YYYY-MM-DD`` in UTC), its value the call's input
and output tokens. The rows are in the store, so every worker sharing it sees every other's
usage (SQLite and PostgreSQL alike); an entity's usage is the sum of its rows of the day, a
type's the sum of all its rows of the day.

Before each model call of a budgeted type the agent loop asks :meth:`Budgets.check`; once the
entity or the type has used its budget for the day, the model is not called and the run ends
``failed`` with ``finish_reason="budget"`` and a message saying which budget and when it
resets. Each worker caches the sums it read for ``cache_s`` seconds (one second by default)
and adds its own calls to them, so checks far from a budget do not scan the table before
every call; once a sum is past half its budget every check reads it from the store. A call
under way is never stopped, so calls that start together may overshoot a budget by what they
use.

Types without a budget never read or write the table (the wake path is unchanged for them).
Rows of days before yesterday are removed by the first worker that records a call on a new day.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from streams import KvPut, Store

from ._errors import DefinitionError

__all__ = ["TOKENS_NS", "BudgetGate", "Budgets", "TokenBudget", "check_budget"]

TOKENS_NS = "tokens"  # key "{day}|{type}|{id}|{step}" -> {"input": n, "output": n}

_MAX = 10**15


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """How many model tokens (input plus output) an agent type may use per UTC day:
    ``per_entity`` for each of its entities, ``per_type`` for all of them together (either may
    be ``None``: no limit of that kind; at least one must be set)."""

    per_entity: int | None = None
    per_type: int | None = None

    def to_json(self) -> dict[str, int | None]:
        return {"per_entity": self.per_entity, "per_type": self.per_type}


def check_budget(budget: object) -> TokenBudget | None:
    """``budget`` (a :class:`TokenBudget` or ``None``) if it is valid.

    Raises:
        DefinitionError: not a TokenBudget, neither limit set, or a limit that is not a
            whole number of at least 1.
    """
    if budget is None:
        return None
    if not isinstance(budget, TokenBudget):
        raise DefinitionError(
            f"token_budget must be a TokenBudget(per_entity=..., per_type=...), not {budget!r}"
        )
    if budget.per_entity is None and budget.per_type is None:
        raise DefinitionError("token_budget needs per_entity or per_type (tokens per day)")
    for name in ("per_entity", "per_type"):
        value = getattr(budget, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX
        ):
            raise DefinitionError(
                f"token_budget.{name} must be a whole number of tokens from 1 to {_MAX}, "
                f"not {value!r}"
            )
    return budget


def _day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


class Budgets:
    """One process's view of the token usage rows of ``store`` (see the module docstring)."""

    def __init__(self, store: Store, *, cache_s: float = 1.0) -> None:
        self.store = store
        self.cache_s = cache_s
        self._sums: dict[str, tuple[float, int]] = {}  # key prefix -> (read at, tokens)
        self._pruned: str | None = None  # the day this process last removed old rows

    async def used(self, prefix: str, limit: int) -> int:
        """The tokens recorded under ``prefix``: from the cache when it is under ``cache_s``
        old and shows less than half of ``limit``, else read. Raises whatever the store
        raises."""
        cached = self._sums.get(prefix)
        mono = time.monotonic()
        if cached is not None and mono - cached[0] < self.cache_s and cached[1] * 2 < limit:
            return cached[1]
        total = 0
        for _key, raw in await self.store.kv_scan(TOKENS_NS, prefix):
            row = orjson.loads(raw)
            total += int(row.get("input", 0)) + int(row.get("output", 0))
        self._sums[prefix] = (mono, total)
        return total

    async def check(self, budget: TokenBudget, type: str, id: str, now: float) -> str | None:
        """Why the entity ``/type/id`` may not call a model now (a message naming the budget
        used up), or ``None`` when it may. Raises whatever the store raises."""
        day = _day(now)
        reset = "at 00:00 UTC"
        if budget.per_entity is not None:
            used = await self.used(f"{day}|{type}|{id}|", budget.per_entity)
            if used >= budget.per_entity:
                return (
                    f"token budget used up: /{type}/{id} used {used} of its {budget.per_entity} "
                    f"tokens for {day} (per entity); it resets {reset}"
                )
        if budget.per_type is not None:
            used = await self.used(f"{day}|{type}|", budget.per_type)
            if used >= budget.per_type:
                return (
                    f"token budget used up: type {type!r} used {used} of its {budget.per_type} "
                    f"tokens for {day} (per type); it resets {reset}"
                )
        return None

    async def record(
        self, type: str, id: str, step: str, input: int, output: int, now: float
    ) -> None:
        """Record one model call's tokens (idempotent per ``step``). Raises whatever the store
        raises."""
        day = _day(now)
        value = orjson.dumps({"input": input, "output": output, "at": now})
        await self.store.commit([KvPut(TOKENS_NS, f"{day}|{type}|{id}|{step}", value)])
        for prefix in (f"{day}|{type}|{id}|", f"{day}|{type}|"):
            cached = self._sums.get(prefix)
            if cached is not None:
                self._sums[prefix] = (cached[0], cached[1] + input + output)
        if self._pruned != day:
            self._pruned = day
            await self._prune(now)

    async def _prune(self, now: float) -> None:
        """Remove the rows of days before yesterday."""
        keep = _day(now - 86400)
        old = await self.store.kv_scan(TOKENS_NS, end=keep)
        if old:
            await self.store.commit([KvPut(TOKENS_NS, key, None) for key, _ in old])
        self._sums = {k: v for k, v in self._sums.items() if k >= keep}


class BudgetGate:
    """The budget of one entity in one wake (``ctx.budget``): what the agent loop asks before
    a model call and tells after it."""

    def __init__(
        self, budgets: Budgets, budget: TokenBudget, type: str, id: str, now: Callable[[], float]
    ) -> None:
        self.budgets, self.budget, self.type, self.id, self._now = budgets, budget, type, id, now

    async def check(self) -> str | None:
        """Why no model may be called now, or ``None`` (see :meth:`Budgets.check`)."""
        return await self.budgets.check(self.budget, self.type, self.id, self._now())

    async def record(self, step: str, input: int, output: int) -> None:
        """Count one model call's tokens (see :meth:`Budgets.record`)."""
        await self.budgets.record(self.type, self.id, step, input, output, self._now())
