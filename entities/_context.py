"""HandlerContext: everything a handler can read and do during one wake.

Reads come from the entity's materialised view plus the wake's own writes. Durable effects
(state changes, replies, tags, manifest entries, sends, spawns) are buffered here and committed by
the runtime in one transaction with the new acknowledged offset, fenced by the lease epoch. Step
results are journaled as they happen, so a re-run of the same wake returns them instead of
calling out again.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import orjson

from streams import Operation

from . import _tracing as tracing
from ._approvals import Resumption
from ._budgets import BudgetGate
from ._calls import call_maybe_async
from ._collections import Actions, Collections, Database
from ._effects import Effects, PendingSend, PendingSpawn, PendingTimer
from ._errors import ContextError, DuplicateEntity, EntityNotFound, ReplayDivergence
from ._events import change
from ._host import Definition, Host
from ._manifest import (
    ChildEntry,
    ContextEntry,
    ManifestEntry,
    ScheduleEntry,
    SharedStateEntry,
    SourceEntry,
    manifest_adapter,
)
from ._observe import SharedState, Source, Wake, observer_value
from ._observe import db as db_source
from ._observe import entity as entity_source
from ._runs import RunBook, RunHandle
from ._steering import Steering
from ._tail import recent_timeline
from ._timers import TimerValue, cron_schedule, timeout_timer, timer_key
from ._urls import EntityURL, check_segment, parse_url
from ._wake import InboxMessage, WakeEvent
from .agent import Agent, AgentConfig, ChatMessage, Tool, runtime_tools
from .agent._window import ContextSource, check_sources, compose

__all__ = ["EntityHandle", "HandlerContext", "InboxMessage", "RunHandle"]


class EntityHandle:
    """A reference to another entity (returned by ``spawn``)."""

    def __init__(self, ctx: HandlerContext, url: EntityURL) -> None:
        self._ctx = ctx
        self.url = url.url
        self.type = url.type
        self.id = url.id

    async def send(self, payload: Any, *, type: str | None = None) -> str:
        """Send ``payload`` to this entity (committed with the wake). Raises as ``ctx.send``."""
        return await self._ctx.send(self.url, payload, type=type)

    async def status(self) -> str:
        """The entity's status (``spawning`` until the wake that spawned it commits)."""
        info = await self._ctx._host.lookup(self.url)
        return "spawning" if info is None else info.status

    async def collection(self, name: str) -> dict[str, Any]:
        """The entity's committed rows of collection ``name`` (``key -> row``)."""
        state = await self._ctx._host.state_of(self.url)
        return dict(state.get(name, {}))

    def __repr__(self) -> str:
        return f"EntityHandle({self.url!r})"


class HandlerContext:
    """What a handler receives with its :class:`WakeEvent`.

    Identity: ``entity_url``, ``entity_type``, ``entity_id``, ``args`` (read-only), ``tags``,
    ``first_wake``. State: ``db`` (``collections`` + ``actions``), ``state`` (the same
    collections), ``actions`` (the type's custom actions). This wake: ``wake``, ``events``.
    Effects: ``send``, ``reply``, ``spawn``, ``set_tag``, ``remove_tag``, ``record_run``,
    ``sleep``. Journaled: ``step``, ``now``, ``uuid``.
    """

    def __init__(
        self,
        *,
        host: Host,
        entity_type: Definition,
        url: EntityURL,
        view: dict[str, dict[str, Any]],
        wake: WakeEvent,
        events: list[dict[str, Any]],
        journal: Mapping[str, Any],
        run_id: str,
        flush: Callable[[list[dict[str, Any]]], Any],
        runs_before: int = 0,
        replaying: bool = False,
    ) -> None:
        self._host = host
        self.replaying = replaying
        self._type = entity_type
        self._url = url
        self._view = view
        self._journal = dict(journal)
        self._flush = flush
        self._counters: dict[str, int] = {}
        self.effects = Effects()
        self.run_id = run_id
        self.runs_before = runs_before
        self.wake = wake
        self.events = events
        self.entity_url = url.url
        self.entity_type = url.type
        self.entity_id = url.id
        self.first_wake = not view.get("manifests")
        created = view.get("entity_created", {}).get("entity") or {}
        self.args: Mapping[str, Any] = MappingProxyType(dict(created.get("args") or {}))
        self.parent: str | None = created.get("parent_url")
        self._db: Database | None = None
        self._actions: _Namespace | None = None
        self._agent: Any = None
        self._context_sources: dict[str, Any] = {}
        self._context_budget = 0
        self.sleeping = False
        self.current_message: InboxMessage | None = None
        self._runs: RunBook | None = None  # made by the first record_run (it refers back)
        self._steering: Steering | None = None
        self.resumption: Resumption | None = None  # a run suspended for approvals goes on
        self.budget: BudgetGate | None = None  # the type's token budget, if it has one

    def _build_state(self) -> Database:
        collections = Collections(self, self._type.state)
        custom = dict(self._type.actions(collections)) if self._type.actions else {}
        self._db = Database(collections, Actions(collections, custom))
        self._actions = _Namespace(custom)
        return self._db

    @property
    def db(self) -> Database:
        """The entity's collections: ``db.collections.<c>`` to read, ``db.actions`` to write."""
        return self._db or self._build_state()

    @property
    def state(self) -> Collections:
        """The same collections as ``db.collections`` (``state.<c>.insert/update/...``)."""
        return self.db.collections

    @property
    def actions(self) -> _Namespace:
        """The type's custom actions (``actions=`` of ``define``)."""
        if self._actions is None:
            self._build_state()
        assert self._actions is not None
        return self._actions

    # -- internals ----------------------------------------------------------------------------

    def _clock_now(self) -> float:
        return self._host.clock.now()

    def _change(
        self, type_: str, key: str, value: Any, operation: Operation, old: Any = None
    ) -> dict[str, Any]:
        return change(type_, key, value, self._clock_now(), operation, txid=self.run_id, old=old)

    def _emit(
        self, type_: str, key: str, value: Any, operation: Operation, old: Any = None
    ) -> None:
        self.effects.own.append(self._change(type_, key, value, operation, old))

    def _next(self, counter: str) -> int:
        n = self._counters.get(counter, 0) + 1
        self._counters[counter] = n
        return n

    def _journaled(self, key: str, produce: Callable[[], Any]) -> Any:
        if key in self._journal:
            return self._journal[key]
        if self.replaying:
            raise ReplayDivergence(f"wake {self.run_id}: {key} was not recorded")
        value = produce()
        self._record(key, value)
        return value

    def _record(self, key: str, value: Any) -> None:
        self._journal[key] = value
        # the run's wake: this one, or the one a run resumed after approvals began in
        entry = {"wake_id": self.run_id, "name": key, "result": value}
        self.effects.journal.append(entry)

    # -- identity ---------------------------------------------------------------------------

    @property
    def tags(self) -> dict[str, str]:
        """The entity's tags (including this wake's changes)."""
        rows = self._view.get("tags", {})
        return {k: str(v.get("value")) for k, v in rows.items() if isinstance(v, dict)}

    @property
    def manifest(self) -> dict[str, ManifestEntry]:
        """Manifest entries by id (including this wake's additions)."""
        rows = self._view.get("manifests", {})
        return {k: manifest_adapter.validate_python(v) for k, v in rows.items()}

    @property
    def messages(self) -> tuple[InboxMessage, ...]:
        """This wake's inbox messages, in order."""
        return self.wake.messages

    # -- effects ----------------------------------------------------------------------------

    def reply(self, message: Any, *, to: InboxMessage | str | None = None) -> None:
        """Answer the caller: recorded in the timeline (``texts``) as this entity's reply.

        ``to`` names the message answered (default: the message being handled, else the last
        message of the wake).
        """
        target = to if to is not None else self.current_message
        if target is None and self.wake.messages:
            target = self.wake.messages[-1]
        in_reply_to = target.key if isinstance(target, InboxMessage) else target
        n = self._next("reply")
        value: dict[str, Any] = {
            "run_id": self.run_id,
            "in_reply_to": in_reply_to,
            "value": message,
        }
        if isinstance(message, str):
            value["text"] = message
        self._emit("texts", f"{self.run_id}:{n}", value, "insert")
        self.effects.replies.append(message)

    async def send(
        self, url: str, payload: Any, *, type: str | None = None, after_ms: int | None = None
    ) -> str:
        """Send ``payload`` to the entity at ``url``; delivered when this wake commits.

        Returns the message key.

        Raises:
            InvalidEntityURL, EntityNotFound, EntityStopped, SchemaValidationFailed.
        """
        target = parse_url(url)
        payload = await self._host.check_send(
            target,
            payload,
            type,
            pending_spawns=self.effects.spawns,
            self_url=self._url,
            exists=self.replaying,
        )
        key = f"{self.entity_id}.{self.run_id}.{self._next('send')}"
        if after_ms is None:
            self.effects.sends.append(PendingSend(target, payload, type, key))
            return key
        if after_ms < 0:
            raise ContextError("after_ms must not be negative")
        fire_at = self._clock_now() + after_ms / 1000
        schedule_id = f"send:{key}"
        timer = TimerValue(
            kind="future_send",
            owner=self.entity_url,
            schedule_id=schedule_id,
            due=fire_at,
            target=target.url,
            payload=payload,
            message_type=type,
        )
        self.effects.timers.append(PendingTimer(timer, schedule_id))
        self._put_manifest(
            ScheduleEntry(
                id=schedule_id,
                schedule_type="future_send",
                fire_at=fire_at,
                target_url=target.url,
                payload=payload,
                message_type=type,
            )
        )
        return key

    def schedule_cron(
        self, id: str, expression: str, *, payload: Any = None, timezone: str = "UTC"
    ) -> ScheduleEntry:
        """Wake this entity on a cron schedule (``wakes`` events with ``kind="cron"``).

        Calling it again with the same ``id`` replaces the schedule. Missed ticks after downtime
        fire once, not in a burst (see ``entities._scheduler``).

        Raises:
            ContextError: an invalid expression or timezone.
        """
        existing = self._view.get("manifests", {}).get(f"cron:{id}")
        timer, replaces, entry = cron_schedule(
            self.entity_url,
            id,
            expression,
            timezone=timezone,
            payload=payload,
            now=self._clock_now(),
            existing=existing,
        )
        self.effects.timers.append(PendingTimer(timer, timer.schedule_id, replaces))
        self._put_manifest(entry)
        return entry

    def cancel_schedule(self, id: str) -> bool:
        """Cancel a cron schedule (by its id) or a pending delayed send (by the message key
        ``send`` returned). Returns whether such a schedule existed."""
        manifests = self._view.get("manifests", {})
        for schedule_id in (f"cron:{id}", f"send:{id}", id):
            entry = manifests.get(schedule_id)
            if entry and entry.get("kind") == "schedule":
                current = None
                if entry.get("fire_at") is not None:
                    current = timer_key(entry["fire_at"], self.entity_url, schedule_id)
                self.effects.timers.append(PendingTimer(None, schedule_id, current))
                data = dict(entry, status="cancelled")
                manifests[schedule_id] = data
                self._emit("manifests", schedule_id, data, "update")
                return True
        return False

    async def observe(
        self, source: Source, *, wake: Wake | str | Mapping[str, Any] | None = None
    ) -> Any:
        """Observe ``source`` (see ``entities.entity/db/entities/cron``); call it on every wake.

        Returns an :class:`EntityHandle` (entity), a :class:`SharedState` handle (db: read and
        write its collections), the list of member URLs (entities) or the schedule entry (cron).

        Raises:
            EntityNotFound: the observed entity or db does not exist (never an empty handle).
            ContextError: an invalid wake condition or cron expression.
        """
        try:
            condition = Wake.parse(wake)
        except (TypeError, ValueError) as exc:
            raise ContextError(f"invalid wake condition: {exc}") from None
        if source.type == "cron":
            return self.schedule_cron(
                f"observe:{source.ref}", source.ref, timezone=source.config.get("timezone", "UTC")
            )
        result: Any
        if source.type == "entity":
            if await self._host.lookup(source.ref) is None:
                raise EntityNotFound(f"cannot observe {source.ref}: no such entity")
            result = EntityHandle(self, parse_url(source.ref))
        elif source.type == "db":
            result = await self._shared(source)
        else:
            tags = source.config.get("tags", {})
            members = await self._host.list_entities()
            result = [m.url for m in members if all(m.tags.get(k) == v for k, v in tags.items())]
        entry = SourceEntry(
            id=source.manifest_id,
            source_type=source.type,
            source_ref=source.ref,
            wake=condition.to_json(),
            config=dict(source.config),
        )
        current = self._view.get("manifests", {}).get(entry.id)
        if current != entry.model_dump(mode="json"):
            self._put_manifest(entry)
            index = f"{source.key}|{self.entity_url}"
            self.effects.observers[index] = observer_value(self.entity_url, source, condition)
            if condition.timeout_ms:
                timer = timeout_timer(
                    self.entity_url, source.key, condition.timeout_ms, self._clock_now()
                )
                self.effects.timers.append(PendingTimer(timer, timer.schedule_id))
        return result

    def unobserve(self, source: Source) -> bool:
        """Stop observing ``source``; returns whether it was observed."""
        manifests = self._view.get("manifests", {})
        entry = manifests.get(source.manifest_id)
        if entry is None or entry.get("status") == "removed":
            return False
        data = dict(entry, config=dict(entry.get("config") or {}, removed=True))
        manifests[source.manifest_id] = data
        self._emit("manifests", source.manifest_id, data, "update")
        self.effects.observers[f"{source.key}|{self.entity_url}"] = None
        if source.type == "cron":
            self.cancel_schedule(f"observe:{source.ref}")
        self.effects.timers.append(PendingTimer(None, f"timeout:{source.key}"))
        return True

    async def mkdb(self, id: str, schema: Mapping[str, Any]) -> SharedState:
        """Create the shared-state db ``id`` (a stream others attach to with ``observe(db(id,
        schema))``); returns its handle. Create-once: calling it again in a later wake returns
        the existing db's handle.

        Raises:
            ContextError: a db with that id exists and was not created by this entity.
        """
        source = db_source(id, schema)
        entry_id = f"shared:{id}"
        if entry_id in self._view.get("manifests", {}) or id in self.effects.new_dbs:
            return await self._shared(source)
        if await self._host.shared_state(id) is not None:
            raise ContextError(f"shared state {id!r} already exists")
        self.effects.new_dbs.add(id)
        collections = {
            n: {"type": d.event_type(n), "primary_key": d.primary_key}
            for n, d in source.schema.items()
        }
        self._put_manifest(SharedStateEntry(id=entry_id, mode="create", collections=collections))
        handle = SharedState(id, source.schema, {})
        self.effects.shared[id] = handle
        return handle

    async def _shared(self, source: Source) -> SharedState:
        if source.ref in self.effects.shared:
            return self.effects.shared[source.ref]
        if source.ref in self.effects.new_dbs:
            raise ContextError(f"shared state {source.ref!r} is being created")
        view = await self._host.shared_state(source.ref)
        if view is None:
            raise EntityNotFound(f"no shared state {source.ref!r}")
        handle = SharedState(source.ref, source.schema, view)
        self.effects.shared[source.ref] = handle
        return handle

    def list_schedules(self) -> list[ScheduleEntry]:
        """Every schedule in the manifest (cron and delayed sends, any status)."""
        return [e for e in self.manifest.values() if isinstance(e, ScheduleEntry)]

    async def spawn(
        self,
        type: str,
        id: str,
        *,
        args: Mapping[str, Any] | None = None,
        initial_message: Any = None,
        initial_message_type: str | None = None,
        tags: Mapping[str, str] | None = None,
        wake: Wake | str | Mapping[str, Any] | None = "run_finished",
        observe: bool = True,
    ) -> EntityHandle:
        """Create a child entity when this wake commits, recorded as a ``child`` manifest entry.

        ``wake`` says when the child wakes this entity: ``"run_finished"`` (the default; also
        ``Wake(on="run_finished")`` or ``{"on": "run_finished"}``) after each run of the child,
        with ``finished_child``; a ``change`` condition (``Wake(on="change", ...)``) when the
        child's collections change, like :meth:`observe`; ``None`` (or ``observe=False``)
        never.

        Spawning is create-once: calling it again with the same ``(type, id)`` (in this or a
        later wake) returns the existing child's handle without creating anything.

        Raises:
            UnknownEntityType, InvalidEntityURL, SchemaValidationFailed: bad type, id or args.
            ContextError: an invalid wake condition.
            DuplicateEntity: the URL belongs to an entity that is not this one's child (another
                client or entity created it); the handler may catch it.
        """
        entity_type = self._host.entity_type(type)
        target = EntityURL(check_segment(type, "type"), check_segment(id, "id"))
        entry_id = f"child:{target.url}"
        if entry_id in self._view.get("manifests", {}):
            return EntityHandle(self, target)
        if any(s.target == target for s in self.effects.spawns):
            raise DuplicateEntity(f"{target.url} is already spawned in this wake", url=target.url)
        # in replay the child exists: this very wake created it
        if not self.replaying and await self._host.lookup(target.url) is not None:
            raise DuplicateEntity(f"entity {target.url} already exists", url=target.url)
        try:
            condition = None if wake is None or not observe else Wake.parse(wake)
        except (TypeError, ValueError) as exc:
            raise ContextError(f"invalid wake condition: {exc}") from None
        checked_args = entity_type.validate_args(dict(args or {}))
        if initial_message is not None:
            initial_message = entity_type.validate_message(initial_message, initial_message_type)
        finished = condition is not None and condition.on == "run_finished"
        self.effects.spawns.append(
            PendingSpawn(
                target,
                checked_args,
                dict(tags or {}),
                initial_message,
                initial_message_type,
                "run_finished" if finished else None,
            )
        )
        if condition is not None and not finished:  # wake on the child's changes
            source = entity_source(target.url)
            index = f"{source.key}|{self.entity_url}"
            self.effects.observers[index] = observer_value(self.entity_url, source, condition)
        shown = wake if isinstance(wake, str) or wake is None else condition and condition.to_json()
        entry = ChildEntry(
            id=entry_id, entity_type=type, entity_url=target.url, wake=shown, observed=observe
        )
        self._put_manifest(entry)
        return EntityHandle(self, target)

    def _put_manifest(self, entry: ManifestEntry) -> None:
        rows = self._view.setdefault("manifests", {})
        data = entry.model_dump(mode="json")
        operation: Operation = "update" if entry.id in rows else "insert"
        rows[entry.id] = data
        self._emit("manifests", entry.id, data, operation)

    def set_tag(self, key: str, value: str) -> None:
        """Set a tag (visible to ``entities ps --tag`` and tag observers)."""
        if not key or not isinstance(value, str):
            raise ContextError("tags are non-empty string keys with string values")
        rows = self._view.setdefault("tags", {})
        operation: Operation = "update" if key in rows else "insert"
        rows[key] = {"value": value}
        self._emit("tags", key, {"value": value}, operation)

    def remove_tag(self, key: str) -> None:
        """Remove a tag (no-op if absent)."""
        rows = self._view.setdefault("tags", {})
        if rows.pop(key, None) is not None:
            self._emit("tags", key, None, "delete")

    def record_run(self) -> RunHandle:
        """Start an explicitly recorded run within this wake (the wake's own run is automatic)."""
        if self._runs is None:
            self._runs = RunBook(self._emit, self._clock_now)
        return RunHandle(self._runs, f"{self.run_id}.run{self._next('run')}")

    def sleep(self) -> None:
        """Do not wake again for what arrives while this wake runs: when it commits, the entity
        stays idle until the next event arrives (which then wakes it with everything since)."""
        self.sleeping = True

    @property
    def tokens(self) -> tuple[int, int]:
        """Model tokens (input, output) of the runs ended in this wake."""
        return (0, 0) if self._runs is None else self._runs.tokens

    def _release(self) -> None:
        """The wake is over (the runtime calls this after its commit): let go of what refers
        back to this context (its state, actions, agent and run book), so the context is freed
        when its last reference goes rather than by the cycle collector."""
        self._db = self._actions = self._agent = None
        if self._runs is not None:
            self._runs.close()

    def end_open_runs(self, status: str) -> None:
        """End every run of :meth:`record_run` the handler left open, as ``status``."""
        book = self._runs
        if book is None:
            return
        for run in list(book.open):
            run.end(status, finish_reason="wake_ended")

    # -- journal ----------------------------------------------------------------------------

    def now(self) -> float:
        """The current time (journaled: a re-run or replay of this wake sees the same value)."""
        return float(self._journaled(f"now:{self._next('now')}", self._clock_now))

    def uuid(self) -> str:
        """A random UUID (journaled like :meth:`now`)."""
        return str(self._journaled(f"uuid:{self._next('uuid')}", lambda: str(uuid_module.uuid4())))

    async def step(self, id: str, fn: Callable[[], Any], *, span: bool = True) -> Any:
        """Run ``fn`` (sync or async) once per wake: its JSON result is journaled under ``id``
        (traced as a span unless ``span=False``: the runtime's own bookkeeping steps).

        A re-run of this wake (after a crash or retry, or in replay) returns the recorded result
        without calling ``fn``. An exception is not recorded; the next attempt calls ``fn`` again.

        Raises:
            ContextError: the id was already used in this wake, or the result is not JSON.
        """
        key = f"step:{id}"
        if key in self._counters:
            raise ContextError(f"step id {id!r} is used twice in one wake")
        self._counters[key] = 1
        if key in self._journal:
            return self._journal[key]
        if self.replaying:
            raise ReplayDivergence(f"wake {self.run_id}: step {id!r} was not recorded")
        if span and tracing.active():
            with tracing.span(f"step {id}", {"entities.url": self.entity_url}):
                result = await call_maybe_async(fn)
        else:
            result = await call_maybe_async(fn)
        try:
            orjson.dumps(result)
        except TypeError as exc:
            raise ContextError(f"step {id!r} returned a value that is not JSON: {exc}") from None
        self._record(key, result)
        await self.flush_journal()
        return result

    async def flush_journal(self) -> None:
        """Write pending journal entries now (fenced by this wake's lease)."""
        if self.effects.journal and not self.replaying:
            entries, self.effects.journal = self.effects.journal, []
            changes = [
                self._change("steps", f"{e['wake_id']}/{e['name']}", e, "insert") for e in entries
            ]
            await call_maybe_async(self._flush, changes)

    async def append_live(
        self, collection: str, key: str, value: Any, operation: Operation = "insert"
    ) -> None:
        """Append a change event to this entity's stream *now*, not at the end of the wake.

        For progress that clients should see while the wake runs (streamed text, partial
        output). It is fenced by the wake's lease like every other write; it is not undone if
        the wake later fails (a retry appends again, so key live rows by something stable).

        Raises:
            LeaseLost: (internally) when the lease was lost; the wake then stops.
        """
        if not self.replaying:
            await call_maybe_async(self._flush, [self._change(collection, key, value, operation)])

    @property
    def runtime_tools(self) -> list[Tool]:
        """The host tools (send, spawn, schedules) bound to this wake, for agents."""
        return runtime_tools(self)

    # -- agents and context -----------------------------------------------------------------

    def use_agent(
        self,
        system_prompt: str,
        model: Any = "test:scripted",
        *,
        tools: Sequence[Any] = (),
        max_rounds: int = 8,
        temperature: float | None = None,
        max_tokens: int = 4096,
        test_responses: Any = None,
        get_api_key: Callable[[str], str | None] | None = None,
        history: int = 20,
    ) -> Any:
        """Configure this wake's agent (then ``await ctx.agent.run()``).

        ``model`` is ``"anthropic:NAME"``, ``"openai:NAME"`` or a model client; with
        ``test_responses`` the scripted test model answers instead (no key, no network).

        Raises:
            ContextError: an invalid configuration (duplicate tool names, max_rounds < 1).
        """
        config = AgentConfig(
            system_prompt,
            model,
            tuple(tools),
            max_rounds,
            temperature,
            max_tokens,
            test_responses,
            get_api_key,
            history,
        )
        try:
            self._agent = Agent(self, config)
        except ValueError as exc:
            raise ContextError(str(exc)) from None
        return self._agent

    @property
    def agent(self) -> Any:
        """The agent configured by :meth:`use_agent` in this wake.

        Raises:
            ContextError: ``use_agent`` was not called.
        """
        if self._agent is None:
            raise ContextError("call ctx.use_agent(...) before ctx.agent")
        return self._agent

    async def timeline_messages(
        self, *, since: str | None = None, last: int | None = None
    ) -> list[ChatMessage]:
        """The entity's timeline as model messages: inbox messages as ``user``, replies as
        ``assistant`` (this wake's replies included), oldest first; ``since`` an offset,
        ``last`` the most recent N (read backwards from the tail until they are certain; with
        neither, the whole timeline is read)."""
        own = [e for e in self.effects.own if e["type"] in ("texts", "tool_calls")]
        return await recent_timeline(self._host, self.entity_url, own, since=since, last=last)

    async def steering_messages(self) -> list[dict[str, Any]]:
        """Messages sent with ``mode="steer"`` since this wake's range that no run of it took
        yet (see :mod:`entities._steering`); each is taken: recorded so the next wake does not
        deliver it again. Raises whatever the store raises."""
        return await self._steerer().take()

    def _steerer(self) -> Steering:
        if self._steering is None:
            self._steering = Steering(
                lambda url, offset: self._host.read(url, offset, limit=1000),
                self.entity_url,
                self.wake.to_offset,
            )
        return self._steering

    async def attachment_bytes(self, stream: str) -> bytes:
        """The content of an attachment sent as a ``stream`` reference (the stream's messages'
        bytes, in order; at most 32 MiB).

        Raises:
            EntitiesError: no such stream, or a larger one.
        """
        return await self._host.stream_bytes(stream)

    def took_steering(self, message: Mapping[str, Any]) -> None:
        """Record that this wake's run took the steering ``message`` (a row
        :meth:`steering_messages` returned, now or in an earlier attempt of the wake)."""
        self._steerer().mark(message["key"])
        row = {k: v for k, v in message.items() if k != "key"}
        self._emit("inbox", message["key"], {**row, "steered_into": self.run_id}, "update")

    def insert_context(
        self,
        id: str,
        content: str,
        *,
        name: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> ContextEntry:
        """Add or replace a durable context entry; it appears in every model call."""
        entry = ContextEntry(
            id=f"context:{id}",
            name=name or id,
            content=content,
            attrs=dict(attrs or {}),
            inserted_at=self._clock_now(),
        )
        self._put_manifest(entry)
        return entry

    def remove_context(self, id: str) -> bool:
        """Remove a context entry; returns whether it existed."""
        rows = self._view.setdefault("manifests", {})
        key = f"context:{id}"
        if rows.pop(key, None) is None:
            return False
        self._emit("manifests", key, None, "delete")
        return True

    def get_context(self, id: str) -> ContextEntry | None:
        """A context entry by id, or ``None``."""
        entry = self.manifest.get(f"context:{id}")
        return entry if isinstance(entry, ContextEntry) else None

    def list_context(self) -> list[ContextEntry]:
        """Every context entry, oldest first."""
        entries = [e for e in self.manifest.values() if isinstance(e, ContextEntry)]
        return sorted(entries, key=lambda e: (e.inserted_at, e.id))

    def use_context(self, *, source_budget: int, sources: Mapping[str, Any]) -> None:
        """Declare context sources for this wake's model calls: ``{name: {"content": text |
        messages | fn, "max": tokens, "cache": "pinned"|"stable"|"slow-changing"|"volatile"}}``.

        Raises:
            ContextError: non-volatile maxima over the budget, a missing max, an unknown tier.
        """
        parsed = {
            n: v if isinstance(v, ContextSource) else ContextSource(**dict(v))
            for n, v in sources.items()
        }
        check_sources(source_budget, parsed)
        self._context_budget = source_budget
        self._context_sources = parsed

    async def composed_context(self) -> str:
        """The context block the agent adds to its system prompt: context entries, then the
        ``use_context`` sources within their budget."""
        parts = [f'<context name="{e.name}">\n{e.content}\n</context>' for e in self.list_context()]
        if self._context_sources:
            parts.append(await compose(self._context_budget, self._context_sources))
        return "\n".join(parts)


class _Namespace:
    def __init__(self, items: dict[str, Callable[..., Any]]) -> None:
        self._items = items

    def __getattr__(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            raise AttributeError(f"no action {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items
