"""Per-provider rate limits on model calls, for this process.

:func:`limit_models` sets, for a provider (``anthropic``, ``openai``, or the provider part of
any client's ``name``), at most ``per_minute`` calls started in any 60 seconds and at most
``concurrent`` calls under way at once. A call over a limit *waits* for its turn (it does not
fail); the agent loop takes a turn before each model call it actually makes (a journaled call
re-used by a re-run takes none). The same limits can come from the environment, read when a
provider is first used: ``ENTITIES_MODEL_LIMIT_<PROVIDER>="per_minute=50,concurrent=4"``.

The limits are per process (each worker has its own); with N workers a provider sees up to N
times the limit. Waits are counted in ``entities_model_limit_waits`` (``GET /metrics``).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import anyio

from .._errors import DefinitionError
from .._metrics import metrics

__all__ = ["ModelLimit", "limit_models", "model_limits"]

_POLL_S = 0.02  # how often a call waiting for a concurrent slot looks again


@dataclass(frozen=True, slots=True)
class ModelLimit:
    """A provider's limits (``None``: no limit of that kind)."""

    per_minute: int | None = None
    concurrent: int | None = None


class _Gate:
    """One provider's limit and the calls it let through (thread-safe: ``entities serve``
    runs its worker on another thread than the server)."""

    def __init__(self, limit: ModelLimit) -> None:
        self.limit = limit
        self.started: deque[float] = deque()  # monotonic start times of the last minute
        self.running = 0
        self.lock = threading.Lock()

    def try_enter(self) -> float:
        """Take a turn: 0 when taken, else how long to wait before trying again."""
        now = time.monotonic()
        with self.lock:
            while self.started and self.started[0] <= now - 60:
                self.started.popleft()
            if self.limit.concurrent is not None and self.running >= self.limit.concurrent:
                return _POLL_S
            if self.limit.per_minute is not None and len(self.started) >= self.limit.per_minute:
                return max(0.001, self.started[0] + 60 - now)
            self.started.append(now)
            self.running += 1
            return 0.0

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


class _Limits:
    def __init__(self) -> None:
        self._gates: dict[str, _Gate | None] = {}
        self.waits = 0

    def set(self, provider: str, limit: ModelLimit | None) -> None:
        self._gates[provider] = None if limit is None else _Gate(limit)

    def gate(self, provider: str) -> _Gate | None:
        if provider not in self._gates:
            self._gates[provider] = _from_env(provider)
        return self._gates[provider]

    def turn(self, provider: str) -> _Turn:
        """One call's turn of ``provider`` (``async with``: waits for it when over a limit);
        a provider without limits costs one dictionary lookup."""
        gate = self.gate(provider)
        return _FREE if gate is None else _Turn(self, provider, gate)


class _Turn:
    """Holds a gate's turn for one call (see :meth:`_Limits.turn`)."""

    __slots__ = ("gate", "limits", "provider")

    def __init__(self, limits: _Limits | None, provider: str, gate: _Gate | None) -> None:
        self.limits, self.provider, self.gate = limits, provider, gate

    async def __aenter__(self) -> None:
        gate = self.gate
        if gate is None or self.limits is None:
            return
        counted = False
        while (delay := gate.try_enter()) > 0:
            if not counted:
                counted = True
                self.limits.waits += 1
                _count_wait(self.provider)
            await anyio.sleep(delay)

    async def __aexit__(self, *exc: object) -> None:
        if self.gate is not None:
            self.gate.leave()


_FREE = _Turn(None, "", None)


def _count_wait(provider: str) -> None:
    metrics.model_limit_waits.inc((provider,))


model_limits = _Limits()


def _check(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DefinitionError(f"{name} must be a whole number of at least 1, not {value!r}")
    return value


def limit_models(
    provider: str, *, per_minute: int | None = None, concurrent: int | None = None
) -> None:
    """Limit this process's calls to ``provider``'s models: at most ``per_minute`` started in
    any 60 seconds and ``concurrent`` at once (both ``None``: no limit, the default). A call
    over a limit waits for its turn.

    Raises:
        DefinitionError: a limit that is not a whole number of at least 1, or an empty provider.
    """
    if not provider:
        raise DefinitionError("limit_models needs a provider name (anthropic, openai, ...)")
    limit = ModelLimit(_check(per_minute, "per_minute"), _check(concurrent, "concurrent"))
    has_limit = limit.per_minute is not None or limit.concurrent is not None
    model_limits.set(provider, limit if has_limit else None)


def _from_env(provider: str) -> _Gate | None:
    """The gate of ``ENTITIES_MODEL_LIMIT_<PROVIDER>`` (``per_minute=N,concurrent=M``).

    Raises:
        DefinitionError: the variable is malformed.
    """
    name = f"ENTITIES_MODEL_LIMIT_{provider.upper().replace('-', '_')}"
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    values: dict[str, int] = {}
    for part in raw.split(","):
        key, _, value = part.strip().partition("=")
        if key not in ("per_minute", "concurrent") or not value.strip().isdigit():
            raise DefinitionError(
                f"{name}={raw!r}: use per_minute=N and/or concurrent=N, separated by commas"
            )
        values[key] = int(value)
    limit = ModelLimit(
        _check(values.get("per_minute"), "per_minute"),
        _check(values.get("concurrent"), "concurrent"),
    )
    return _Gate(limit)
