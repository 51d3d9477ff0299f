"""Entity types: ``Registry.define(...)`` and the schemas and hooks each type carries."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias, overload

from pydantic import BaseModel, ValidationError

from ._budgets import TokenBudget, check_budget
from ._calls import call_user
from ._collections import CollectionDef, collection
from ._context import HandlerContext
from ._errors import DefinitionError, SchemaValidationFailed, UnknownEntityType
from ._host import ActionsFactory
from ._process import ProcessAgent
from ._retention import Retention
from ._signals import Signal, signal_of
from ._turns import ProcessSession, ProcessSpec
from ._urls import check_segment
from ._wake import InboxMessage, WakeEvent

__all__ = ["EntityType", "Handler", "Registry"]

Handler: TypeAlias = Callable[[HandlerContext, WakeEvent], Awaitable[None] | None]
OnMessage: TypeAlias = Callable[[HandlerContext, InboxMessage], Awaitable[Any] | Any]
OnError: TypeAlias = Callable[[HandlerContext, BaseException], Awaitable[None] | None]
OnCreate: TypeAlias = Callable[[HandlerContext], Awaitable[None] | None]
OnStop: TypeAlias = Callable[[HandlerContext, str], Awaitable[None] | None]
OnSignal: TypeAlias = Callable[[HandlerContext, Signal], Awaitable[None] | None]


def _check_options(
    max_attempts: int, wake_timeout: float | None, max_concurrency: int | None = None
) -> None:
    if max_attempts < 1:
        raise DefinitionError("max_attempts must be at least 1")
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
        or not 1 <= max_concurrency <= 1000
    ):  # fmt: skip
        raise DefinitionError(
            f"max_concurrency must be a whole number from 1 to 1000, not {max_concurrency!r}"
        )
    if wake_timeout is not None and not wake_timeout > 0:
        raise DefinitionError(
            f"wake_timeout must be a positive number of seconds, not {wake_timeout}"
        )


def _errors(exc: ValidationError) -> list[Any]:
    return [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False)
    ]


@dataclass(slots=True)
class EntityType:
    """A registered entity type."""

    name: str
    handler: Handler
    description: str = ""
    state: dict[str, CollectionDef] = field(default_factory=dict)
    actions: ActionsFactory | None = None
    args_schema: type[BaseModel] | None = None
    inbox: type[BaseModel] | dict[str, type[BaseModel]] | None = None
    on_message: OnMessage | None = None
    on_error: OnError | None = None
    max_attempts: int = 3
    options: dict[str, Any] = field(default_factory=dict)
    on_create: OnCreate | None = None
    on_stop: OnStop | None = None
    on_signal: OnSignal | None = None
    max_concurrency: int | None = None  # at most this many wakes at once, across workers
    token_budget: TokenBudget | None = None  # model tokens per UTC day (see entities._budgets)
    wake_timeout: float | None = None  # seconds; None: the worker's default
    retention: Retention = field(default_factory=Retention)  # what compaction may remove

    def validate_args(self, args: Any) -> dict[str, Any]:
        """Validate spawn args against ``args_schema``; return them as JSON-ready data.

        Raises:
            SchemaValidationFailed: the args do not fit the schema (or are not an object).
        """
        if args is None:
            args = {}
        if self.args_schema is None:
            if not isinstance(args, dict):
                raise SchemaValidationFailed("spawn args must be a JSON object")
            return args
        try:
            return self.args_schema.model_validate(args).model_dump(mode="json")
        except ValidationError as exc:
            raise SchemaValidationFailed(
                f"args for {self.name!r} do not match {self.args_schema.__name__}", _errors(exc)
            ) from None

    def validate_message(self, payload: Any, message_type: str | None) -> Any:
        """Validate an inbox message against the type's ``inbox`` schema(s).

        Raises:
            SchemaValidationFailed: unknown message type, or the payload does not fit.
        """
        if self.inbox is None:
            return payload
        if isinstance(self.inbox, dict):
            if message_type is None or message_type not in self.inbox:
                known = ", ".join(sorted(self.inbox))
                raise SchemaValidationFailed(
                    f"{self.name!r} accepts message types {known}; got {message_type!r}"
                )
            model = self.inbox[message_type]
        else:
            model = self.inbox
        try:
            return model.model_validate(payload).model_dump(mode="json")
        except ValidationError as exc:
            raise SchemaValidationFailed(
                f"message for {self.name!r} does not match {model.__name__}", _errors(exc)
            ) from None

    async def invoke(self, ctx: HandlerContext, wake: WakeEvent) -> None:
        """Run this type's code for one wake: ``on_create`` in the entity's first wake (the one
        holding its creation), ``on_message`` for each message (a message it answers is replied
        to and taken out of the wake), then the handler, unless ``on_message`` answered
        everything and nothing else woke the entity. A hook or handler that is a plain ``def``
        runs on a worker thread (see :func:`~entities._calls.call_user`).

        Raises whatever the hook or the handler raises.
        """
        if self.on_create is not None and any(w.get("kind") == "created" for w in wake.wakes):
            await call_user(self.on_create, ctx)
        signals = [s for s in map(signal_of, wake.wakes) if s is not None]
        if signals:
            if self.on_signal is not None:
                for signal in signals:
                    await call_user(self.on_signal, ctx, signal)
            rest = tuple(w for w in wake.wakes if w.get("kind") != "signal")
            if not rest and not wake.messages:
                return
            wake = replace(wake, wakes=rest)
            ctx.wake = wake
        remaining = list(wake.messages)
        if self.on_message is not None and wake.messages:
            remaining = []
            for message in wake.messages:
                ctx.current_message = message
                answer = await call_user(self.on_message, ctx, message)
                if answer is None:
                    remaining.append(message)
                else:
                    ctx.reply(answer, to=message)
            ctx.current_message = None
            if not remaining and not wake.wakes:
                return
            wake = replace(wake, messages=tuple(remaining))
            ctx.wake = wake
        await call_user(self.handler, ctx, wake)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (for ``entities types`` and ``GET /_entities/types``)."""
        inbox: Any = None
        if isinstance(self.inbox, dict):
            inbox = {k: m.model_json_schema() for k, m in self.inbox.items()}
        elif self.inbox is not None:
            inbox = self.inbox.model_json_schema()
        return {
            "name": self.name,
            "description": self.description,
            "args_schema": None
            if self.args_schema is None
            else self.args_schema.model_json_schema(),
            "inbox_schema": inbox,
            "max_concurrency": self.max_concurrency,
            "token_budget": None if self.token_budget is None else self.token_budget.to_json(),
            "state": {
                name: {"type": d.event_type(name), "primary_key": d.primary_key}
                for name, d in self.state.items()
            },
        }


class Registry:
    """The entity types an application defines. Names are unique."""

    def __init__(self) -> None:
        self._types: dict[str, EntityType] = {}
        # where the registry was loaded from (``module:attr`` / ``/abs/file.py:attr``); the CLI
        # records it in the store so ``entities replay`` finds the code of a type
        self.source: str | None = None

    @overload
    def define(
        self,
        name: str,
        *,
        handler: Handler,
        description: str = "",
        state: Mapping[str, CollectionDef] | None = None,
        actions: ActionsFactory | None = None,
        args_schema: type[BaseModel] | None = None,
        inbox: type[BaseModel] | Mapping[str, type[BaseModel]] | None = None,
        on_message: OnMessage | None = None,
        on_error: OnError | None = None,
        on_create: OnCreate | None = None,
        on_stop: OnStop | None = None,
        on_signal: OnSignal | None = None,
        max_concurrency: int | None = None,
        token_budget: TokenBudget | None = None,
        max_attempts: int = 3,
        wake_timeout: float | None = None,
        retention: Retention | None = None,
    ) -> EntityType: ...

    @overload
    def define(
        self,
        name: str,
        *,
        handler: None = None,
        description: str = "",
        state: Mapping[str, CollectionDef] | None = None,
        actions: ActionsFactory | None = None,
        args_schema: type[BaseModel] | None = None,
        inbox: type[BaseModel] | Mapping[str, type[BaseModel]] | None = None,
        on_message: OnMessage | None = None,
        on_error: OnError | None = None,
        on_create: OnCreate | None = None,
        on_stop: OnStop | None = None,
        on_signal: OnSignal | None = None,
        max_concurrency: int | None = None,
        token_budget: TokenBudget | None = None,
        max_attempts: int = 3,
        wake_timeout: float | None = None,
        retention: Retention | None = None,
    ) -> Callable[[Handler], Handler]: ...

    def define(
        self,
        name: str,
        *,
        handler: Handler | None = None,
        description: str = "",
        state: Mapping[str, CollectionDef] | None = None,
        actions: ActionsFactory | None = None,
        args_schema: type[BaseModel] | None = None,
        inbox: type[BaseModel] | Mapping[str, type[BaseModel]] | None = None,
        on_message: OnMessage | None = None,
        on_error: OnError | None = None,
        on_create: OnCreate | None = None,
        on_stop: OnStop | None = None,
        on_signal: OnSignal | None = None,
        max_concurrency: int | None = None,
        token_budget: TokenBudget | None = None,
        max_attempts: int = 3,
        wake_timeout: float | None = None,
        retention: Retention | None = None,
    ) -> EntityType | Callable[[Handler], Handler]:
        """Define an entity type, directly (``handler=``) or as a decorator.

        Hooks: ``on_message(ctx, message)`` may answer a message before the handler sees it;
        ``on_create(ctx)`` runs once, in the entity's first wake, before the handler;
        ``on_error(ctx, error)`` runs when a wake is dead-lettered; ``on_stop(ctx, reason)``
        runs when a running wake is cancelled because the entity was killed or interrupted
        (``reason`` ``"killed"`` or ``"interrupted"``; cleanup: its writes are not committed);
        ``on_signal(ctx, signal)`` receives each pause, resume and interrupt signal in the
        entity's next wake (a wake of signals alone runs only it).
        ``wake_timeout`` (seconds) overrides the worker's default; ``max_concurrency``: at
        most that many wakes of this type run at once, across all workers sharing the store.
        ``token_budget``: model tokens its agents may use per UTC day, per entity and per type
        (:class:`~entities.TokenBudget`); past it a run ends ``failed``, reason ``budget``.
        ``retention`` says what compaction removes (default: :class:`~entities.Retention()`).

        Raises:
            DefinitionError: the name is taken or invalid, or an option is out of range.
        """
        check_segment(name, "type")
        if name in self._types:
            raise DefinitionError(f"entity type {name!r} is already defined")
        _check_options(max_attempts, wake_timeout, max_concurrency)
        check_budget(token_budget)

        def register(fn: Handler) -> EntityType:
            if name in self._types:
                raise DefinitionError(f"entity type {name!r} is already defined")
            entity_type = EntityType(
                name=name,
                handler=fn,
                description=description,
                state=dict(state or {}),
                actions=actions,
                args_schema=args_schema,
                inbox=dict(inbox) if isinstance(inbox, Mapping) else inbox,
                on_message=on_message,
                on_error=on_error,
                max_attempts=max_attempts,
                on_create=on_create,
                on_stop=on_stop,
                on_signal=on_signal,
                max_concurrency=max_concurrency,
                token_budget=token_budget,
                wake_timeout=wake_timeout,
                retention=retention or Retention(),
            )
            self._types[name] = entity_type
            return entity_type

        if handler is not None:
            return register(handler)

        def decorator(fn: Handler) -> Handler:
            register(fn)
            return fn

        return decorator

    def define_process(
        self,
        name: str,
        *,
        command: Sequence[str],
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        env_allowlist: Iterable[str] | None = None,
        timeout_s: float = 60,
        kill_grace_s: float = 5,
        streaming: bool = True,
        max_reply_chars: int = 8000,
        description: str = "",
        max_attempts: int = 1,
    ) -> EntityType:
        """Define a subprocess agent: each inbox message runs ``command`` once, speaking the
        agentproc protocol (wire 0.1 and 0.4; see ``entities._process``).

        ``env`` values may use ``${VAR}`` (the worker's environment; only the names in
        ``env_allowlist`` when it is given) and ``{{MESSAGE}}``/``{{SESSION_ID}}``/
        ``{{SESSION_NAME}}`` (also in ``command``). The program inherits the worker's
        environment. The session id lives in the ``sessions`` state collection.

        Raises:
            DefinitionError: the name is taken or invalid, ``command`` is empty, or an option is
                out of range.
        """
        argv = [str(part) for part in command] if not isinstance(command, str) else []
        if not argv or not argv[0]:
            raise DefinitionError("command must be a non-empty list of strings")
        if timeout_s <= 0 or kill_grace_s < 0:
            raise DefinitionError("timeout_s must be positive and kill_grace_s not negative")
        if max_reply_chars < 1:
            raise DefinitionError("max_reply_chars must be at least 1")
        _check_options(max_attempts, None)
        check_segment(name, "type")
        spec = ProcessSpec(
            command=tuple(argv),
            cwd=None if cwd is None else os.fspath(cwd),
            env=dict(env or {}),
            env_allowlist=None if env_allowlist is None else frozenset(env_allowlist),
            timeout_s=float(timeout_s),
            kill_grace_s=float(kill_grace_s),
            streaming=streaming,
            max_reply_chars=max_reply_chars,
        )
        agent = ProcessAgent(spec)
        return self.add(
            EntityType(
                name=name,
                handler=agent.handle,
                description=description or f"subprocess agent: {' '.join(argv)}",
                state={"sessions": collection(ProcessSession)},
                on_error=agent.on_error,
                max_attempts=max_attempts,
                options={"process": spec},
            )
        )

    def add(self, entity_type: EntityType) -> EntityType:
        """Register a prepared :class:`EntityType` (used by ``define_process``).

        Raises:
            DefinitionError: the name is taken.
        """
        if entity_type.name in self._types:
            raise DefinitionError(f"entity type {entity_type.name!r} is already defined")
        self._types[entity_type.name] = entity_type
        return entity_type

    def include(self, other: Registry) -> Registry:
        """Add every type of ``other`` to this registry (apps are built from several); returns
        this registry. Including a type already here (the same object) again is a no-op.

        Raises:
            DefinitionError: ``other`` has a different type under a name this registry uses
                (nothing is added).
        """
        clashes = [
            t.name for t in other.list() if t.name in self._types and self._types[t.name] is not t
        ]
        if clashes:
            names = ", ".join(repr(n) for n in clashes)
            raise DefinitionError(f"entity type {names} is already defined differently")
        for entity_type in other.list():
            self._types.setdefault(entity_type.name, entity_type)
        return self

    def get(self, name: str) -> EntityType:
        """The type called ``name``.

        Raises:
            UnknownEntityType: no such type.
        """
        try:
            return self._types[name]
        except KeyError:
            raise UnknownEntityType(f"unknown entity type {name!r}") from None

    def list(self) -> list[EntityType]:
        """All types, sorted by name."""
        return [self._types[n] for n in sorted(self._types)]

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __len__(self) -> int:
        return len(self._types)
