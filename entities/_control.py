"""The control side of the runtime: what people do to entities while they live (signals,
queued messages, approvals, forks). :class:`~entities.Runtime` inherits it."""

from __future__ import annotations

from typing import Any

from streams import StreamExists, StreamGone

from ._approvals import Approval, decide, list_approvals
from ._errors import DuplicateEntity, EntityNotFound, InvalidSignal
from ._fork import fork_ops, fork_point
from ._inbox import change_queued
from ._reads import Reads
from ._records import ENTITY_NS, EntityInfo
from ._signals import SIGNALS, send_signal
from ._urls import parse_url

__all__ = ["Control"]


class Control(Reads):
    """Controls over ``store`` (see :class:`~entities.Runtime`)."""

    async def approvals(self, url: str) -> list[Approval]:
        """The approvals asked for by the entity's agent runs, oldest first (see
        :mod:`entities._approvals`).

        Raises:
            InvalidEntityURL: a bad URL.
            EntityNotFound: no entity at ``url``.
        """
        target = parse_url(url)
        if await self.store.kv_get(ENTITY_NS, target.url) is None:
            raise EntityNotFound(f"no entity at {target.url}", url=target.url)
        return await list_approvals(self.store, target.url)

    async def decide(
        self,
        url: str,
        id: str,
        decision: str,
        *,
        note: str | None = None,
        by: str | None = None,
    ) -> Approval:
        """Approve (``"approve"``) or deny (``"deny"``) the pending approval ``id``: the
        suspended run goes on in the entity's next wake (the tool runs, or the model is told
        it was not approved, with ``note``). Returns the approval as decided.

        Raises:
            InvalidEntityURL: a bad URL.
            InvalidDecision: ``decision`` is neither.
            EntityNotFound, EntityStopped: no entity there, or it was killed.
            ApprovalNotFound: no approval of that id.
            ApprovalNotPending: it was decided already.
        """
        return await decide(self.store, self.clock, parse_url(url), id, decision, note=note, by=by)

    async def cancel_message(self, url: str, key: str) -> None:
        """Cancel the queued message ``key`` of the entity at ``url``: no wake will take it
        (its reply wait ends ``cancelled``); see :mod:`entities._inbox`.

        Raises:
            InvalidEntityURL: a bad URL.
            EntityNotFound: no entity at ``url``.
            EntityStopped: the entity was killed.
            MessageNotQueued: a wake took the message already, it was cancelled, or it was
                never sent.
        """
        await change_queued(self.store, self.clock, parse_url(url), key, cancel=True)

    async def edit_message(
        self, url: str, key: str, payload: Any, *, type: str | None = None
    ) -> dict[str, Any]:
        """Replace the payload (and, with ``type``, the message type) of the queued message
        ``key``, validated like a send; returns the message's row as it now is.

        Raises:
            InvalidEntityURL, UnknownEntityType: a bad URL or type.
            SchemaValidationFailed: the payload fails the type's inbox schema.
            EntityNotFound, EntityStopped, MessageNotQueued: as for :meth:`cancel_message`.
        """
        target = parse_url(url)
        entity_type = self.registry.get(target.type)
        return await change_queued(
            self.store,
            self.clock,
            target,
            key,
            payload=payload,
            message_type=type,
            validate=entity_type.validate_message,
        )

    async def signal(
        self, url: str, signal: str, *, reason: str | None = None, sender: str | None = None
    ) -> EntityInfo:
        """Send ``signal`` (``pause``, ``resume`` or ``interrupt``) to the entity at ``url``
        (see :mod:`entities._signals`): pause stops new wakes from starting (a running one
        finishes), resume lets queued messages run, interrupt cancels the running wake (its run
        ends ``interrupted``) and starts the next. Recorded in the ``signals`` collection; the
        type's ``on_signal`` hook receives it in the entity's next wake.

        Raises:
            InvalidEntityURL: a bad URL.
            InvalidSignal: ``signal`` is none of those.
            EntityNotFound: no entity at ``url``.
            EntityStopped: the entity was killed.
        """
        target = parse_url(url)
        if signal not in SIGNALS:
            raise InvalidSignal(
                f"unknown signal {signal!r}: one of {', '.join(SIGNALS)}", url=target.url
            )
        await send_signal(self.store, self.clock, target, signal, reason=reason, sender=sender)
        return await self.get(target.url)

    async def fork(self, url: str, id: str, *, at: str | None = None) -> EntityInfo:
        """A new entity ``/{type}/{id}`` of the same type whose history is the entity at ``url``
        up to ``at`` (an offset of its stream, ``"latest_completed_run"``, or by default its
        acknowledged offset), then its own (see :mod:`entities._fork`). The history is shared,
        not copied. The fork has no parent, children or schedules; it is idle until sent a
        message.

        Raises:
            InvalidEntityURL: a bad URL or id.
            EntityNotFound: no entity at ``url``.
            DuplicateEntity: an entity exists at the fork's URL.
            InvalidForkPoint: ``at`` is malformed, beyond the source's tail, or names no run.
        """
        source_url = parse_url(url)
        target = parse_url(f"/{source_url.type}/{id}")
        found = await self.record(source_url.url)
        if found is None:
            raise EntityNotFound(f"no entity at {source_url.url}", url=source_url.url)
        point = await fork_point(self.store, found[0], at)
        ops, _record = await fork_ops(self.store, found[0], target, point, self.clock.now())
        try:
            await self.store.commit(ops)
        except (StreamExists, StreamGone):
            raise DuplicateEntity(f"entity {target.url} already exists", url=target.url) from None
        return await self.get(target.url)
