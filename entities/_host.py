"""What a handler may reach beyond its own entity, as protocols: the host (a
:class:`~entities.Runtime` is one), the checks it offers before a spawn, and what a
:class:`~entities.HandlerContext` needs of its own entity type. Lower modules name these instead
of importing the runtime above them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ._clock import Clock
from ._collections import CollectionDef
from ._effects import PendingSpawn
from ._records import EntityInfo
from ._urls import EntityURL

__all__ = ["ActionsFactory", "Definition", "Host", "Validator"]

# what ``define(actions=...)`` takes: collections -> {name: action}
ActionsFactory = Callable[[Any], Mapping[str, Callable[..., Any]]]


class Validator(Protocol):
    """What a handler may check about another entity type before it spawns one."""

    def validate_args(self, args: Any) -> dict[str, Any]: ...

    def validate_message(self, payload: Any, message_type: str | None) -> Any: ...


class Definition(Protocol):
    """What a context needs of its own entity type: its state collections and actions."""

    @property
    def state(self) -> Mapping[str, CollectionDef]: ...

    @property
    def actions(self) -> ActionsFactory | None: ...


class Host(Protocol):
    """What a handler may reach beyond its own entity (a :class:`~entities.Runtime` is one):
    the clock, checks before a send or spawn, and reads of other entities and shared dbs.
    Every write goes through the wake's buffered effects instead."""

    @property
    def clock(self) -> Clock: ...

    def entity_type(self, name: str) -> Validator: ...

    async def check_send(
        self,
        target: EntityURL,
        payload: Any,
        message_type: str | None,
        *,
        pending_spawns: Sequence[PendingSpawn] = (),
        self_url: EntityURL | None = None,
        exists: bool = False,
    ) -> Any: ...

    async def lookup(self, url: str) -> EntityInfo | None: ...

    async def list_entities(self) -> list[EntityInfo]: ...

    async def read(
        self, url: str, offset: str = "-1", *, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], str]: ...

    async def stream_bytes(self, path: str, *, limit: int = ...) -> bytes: ...

    async def read_before(
        self, url: str, offset: str = "now", *, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], str]: ...

    async def state_of(self, url: str) -> dict[str, dict[str, Any]]: ...

    async def shared_state(self, id: str) -> dict[str, dict[str, Any]] | None: ...
