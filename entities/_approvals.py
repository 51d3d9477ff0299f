"""Durable approvals: a tool call that waits for a person without holding a worker.

When an agent's model calls a tool that needs approval (``@tool(requires_approval=True)``, or
a predicate on its arguments), the run is *suspended*: the agent raises
:class:`ApprovalPending`, and the wake commits only its journal (the model rounds so far,
flushed as they happened), a ``runs`` row with status ``waiting_approval`` and, for each call,
a row of the ``approvals`` collection (``id, tool, arguments, status, ...``) with its side-table
row (namespace ``approval``, key ``{url}|{id}``: the decision's compare-and-set, and the
listing). It acknowledges its range and releases its lease: nothing waits in memory. Its other
effects (state writes, sends, replies) are not committed: the run is not over.

A decision (``approve``/``deny``, once: the side-table row must still be ``pending``) updates
the row and appends a ``wakes`` event of kind ``approval`` that carries what the run needs to
go on: the wake it began in (its *origin*), that wake's messages, and every decision taken for
that origin so far. The next wake that takes it *resumes* the run: the handler runs again with
the origin's messages (same keys) and the origin's journal, as the origin's run id, so every
model round and tool result already recorded is returned from the journal (no model call is
repeated); the approved tool now runs, a denied one gives the model the result ``not approved``
(with the note). The final reply answers the original message; a further approval suspends it
again. A claim ends a wake's range just before (or at) a decision, so the resumed run takes no
other message with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from streams import Append, ConditionFailed, KvCheck, KvPut, Op, Store, StreamClosed

from ._clock import Clock
from ._errors import (
    ApprovalNotFound,
    ApprovalNotPending,
    EntityNotFound,
    EntityStopped,
    InvalidDecision,
)
from ._events import event, new_token
from ._records import ENTITY_NS, PENDING_NS, SCHEDULE_NS
from ._timers import TimerValue, arm_ops, cancel_ops, schedule_key
from ._urls import EntityURL, parse_url
from ._wake import InboxMessage, WakeEvent

__all__ = [
    "APPROVAL_NS",
    "Approval",
    "ApprovalPending",
    "Resumption",
    "approval_id",
    "approval_json",
    "decide",
    "decision_of",
    "decision_ops",
    "decisions_of",
    "list_approvals",
    "pending_ids",
    "resumed_messages",
    "resumption",
    "suspend_records",
    "wake_end",
]

APPROVAL_NS = "approval"  # key: "{url}|{id}" -> Approval (the decision's compare-and-set)
Decision = Literal["approve", "deny"]
_UNSAFE = re.compile(r"[^A-Za-z0-9._~-]")


class Approval(BaseModel):
    """One tool call waiting for (or given) a person's decision."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["approval"] = "approval"
    v: int = 1
    id: str
    url: str
    tool: str
    arguments: Any = None
    status: Literal["pending", "approved", "denied"] = "pending"
    origin: str  # the wake the run began in (its journal's wake id)
    origin_to: str  # that wake's range end (its journal is read from there)
    runs_before: int = 0
    messages: list[dict[str, Any]] = []  # the origin's inbox messages (what the reply answers)
    requested_at: float
    expires_at: float | None = None  # denied ("timed out") if still pending then
    decided_by: str | None = None
    decided_at: float | None = None
    note: str | None = None

    def row(self) -> dict[str, Any]:
        """The ``approvals`` collection row (what clients and the console read)."""
        return self.model_dump(mode="json", exclude={"kind", "v", "messages"})


class ApprovalPending(BaseException):
    """Raised by an agent run that needs approvals to go on: the runtime suspends the wake.

    A ``BaseException``, so a handler's ``except Exception`` does not swallow it.
    """

    def __init__(self, requests: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(requests)} tool call(s) need approval")
        self.requests = requests  # each {id, tool, arguments}


@dataclass(frozen=True, slots=True)
class Resumption:
    """A wake that resumes a suspended run: its origin and the decisions so far."""

    origin: str
    origin_to: str
    runs_before: int
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)


def approval_id(origin: str, agent: int, round: int, call_id: str) -> str:
    """The stable id of the approval of one tool call (a URL path segment)."""
    return _UNSAFE.sub("_", f"{origin}.a{agent}.r{round}.{call_id}")[:128]


def resumption(wake: WakeEvent) -> Resumption | None:
    """The run ``wake`` resumes, if it holds an approval decision."""
    found: Resumption | None = None
    decisions: dict[str, dict[str, Any]] = {}
    for item in wake.wakes:
        if item.get("kind") != "approval":
            continue
        decisions.update(item.get("decisions") or {})
        found = Resumption(item["origin"], item["origin_to"], int(item.get("runs_before", 0)))
    if found is None:
        return None
    return Resumption(found.origin, found.origin_to, found.runs_before, decisions)


def resumed_messages(wakes: list[dict[str, Any]]) -> list[InboxMessage]:
    """The origin's messages that approval decisions among ``wakes`` carry (once each)."""
    out: dict[str, InboxMessage] = {}
    for item in wakes:
        if item.get("kind") != "approval":
            continue
        for m in item.get("messages") or ():
            out.setdefault(
                m["key"],
                InboxMessage(
                    key=m["key"],
                    payload=m.get("payload"),
                    sender=m.get("sender"),
                    message_type=m.get("message_type"),
                    timestamp=float(m.get("timestamp") or 0.0),
                    offset=m.get("offset", ""),
                    attachments=tuple(m.get("attachments") or ()),
                ),
            )
    return list(out.values())


def wake_end(events: list[dict[str, Any]]) -> str | None:
    """Where a claim ends a wake's range so that a resumed run takes nothing else with it:
    just before the first approval decision when wake events precede it, else at it;
    ``None`` when the range holds no decision."""
    previous: str | None = None
    waking = False
    for item in events:
        kind = item["type"]
        if kind == "wakes" and (item.get("value") or {}).get("kind") == "approval":
            end: str = item["offset"]
            return previous if waking and previous is not None else end
        if kind in ("inbox", "wakes", "entity_created"):
            waking = True
        previous = item["offset"]
    return None


def suspend_records(
    url: str,
    wake: WakeEvent,
    origin: str,
    origin_to: str,
    runs_before: int,
    requests: list[dict[str, Any]],
    known: set[str],
    now: float,
) -> tuple[list[bytes], list[Op], list[str]]:
    """What a suspended wake commits besides its journal: ``approvals`` rows and side-table
    rows for the requests not already pending (``known``); returns (events, operations, the
    ids waited for)."""
    messages = [
        {"key": m.key, "payload": m.payload, "sender": m.sender,
         "message_type": m.message_type, "timestamp": m.timestamp, "offset": m.offset,
         **({"attachments": list(m.attachments)} if m.attachments else {})}
        for m in wake.messages
    ]  # fmt: skip
    events: list[bytes] = []
    ops: list[Op] = []
    for request in requests:
        if request["id"] in known:
            continue
        timeout = request.get("timeout")
        approval = Approval(
            id=request["id"],
            url=url,
            tool=request["tool"],
            arguments=request.get("arguments"),
            origin=origin,
            origin_to=origin_to,
            runs_before=runs_before,
            messages=messages,
            requested_at=now,
            expires_at=None if timeout is None else now + float(timeout),
        )
        raw = approval.model_dump_json().encode()
        events.append(event("approvals", approval.id, approval.row(), now))
        ops.append(KvPut(APPROVAL_NS, f"{url}|{approval.id}", raw))
        if approval.expires_at is not None:  # a timer denies it then, unless decided first
            timer = TimerValue(
                kind="approval",
                owner=url,
                schedule_id=_timer_id(approval.id),
                due=approval.expires_at,
                payload={"approval": raw.decode()},
            )
            ops.extend(arm_ops(timer))
    return events, ops, [r["id"] for r in requests]


def _timer_id(id: str) -> str:
    return f"approval:{id}"


def decision_ops(
    approval: Approval, raw: bytes, status: str, note: str | None, by: str | None, now: float
) -> tuple[list[Op], Approval]:
    """The transaction that decides ``approval`` (stored as ``raw``, checked) as ``status``
    (``approved`` or ``denied``): its row, its ``approvals`` change and the ``wakes`` event
    that resumes the run, and the entity's pending mark (not its timeout timer: the caller's
    business), and the approval as decided."""
    decided = approval.model_copy(
        update={"status": status, "decided_by": by, "decided_at": now, "note": note}
    )
    wake = {
        "kind": "approval",
        "source": by,
        "id": approval.id,
        "decision": "approve" if status == "approved" else "deny",
        "note": note,
        "origin": approval.origin,
        "origin_to": approval.origin_to,
        "runs_before": approval.runs_before,
        "messages": approval.messages,
        "decisions": {approval.id: {"status": status, "note": note, "by": by}},
    }
    target = parse_url(approval.url)
    key = f"{approval.url}|{approval.id}"
    return [
        KvCheck(APPROVAL_NS, key, raw),
        KvPut(APPROVAL_NS, key, decided.model_dump_json().encode()),
        Append(
            target.stream,
            [
                event("approvals", approval.id, decided.row(), now, "update"),
                event("wakes", f"approval:{approval.id}", wake, now),
            ],
        ),
        KvPut(PENDING_NS, target.url, new_token()),
    ], decided


async def decisions_of(store: Store, url: str, origin: str) -> dict[str, dict[str, Any]]:
    """Every decision taken on the approvals of the run that began in wake ``origin``."""
    return {
        a.id: {"status": a.status, "note": a.note, "by": a.decided_by}
        for a in await list_approvals(store, url)
        if a.origin == origin and a.status != "pending"
    }


async def list_approvals(store: Store, url: str) -> list[Approval]:
    """The approvals of the entity at ``url`` (oldest first). Raises whatever the store
    raises."""
    rows = await store.kv_scan(APPROVAL_NS, f"{url}|")
    found = [Approval.model_validate_json(raw) for _key, raw in rows]
    return sorted(found, key=lambda a: (a.requested_at, a.id))


async def pending_ids(store: Store, url: str) -> set[str]:
    """The ids of the approvals of ``url`` still pending."""
    return {a.id for a in await list_approvals(store, url) if a.status == "pending"}


async def decide(
    store: Store,
    clock: Clock,
    target: EntityURL,
    id: str,
    decision: str,
    *,
    note: str | None = None,
    by: str | None = None,
) -> Approval:
    """Approve or deny the pending approval ``id`` of ``target`` (see the module); returns
    it as decided.

    Raises:
        InvalidDecision: ``decision`` is neither ``approve`` nor ``deny``.
        EntityNotFound: no entity there.
        EntityStopped: the entity was killed.
        ApprovalNotFound: no approval of that id.
        ApprovalNotPending: it was decided already.
    """
    if decision not in ("approve", "deny"):
        raise InvalidDecision(
            f"a decision is 'approve' or 'deny', not {decision!r}", url=target.url
        )
    key = f"{target.url}|{id}"
    while True:
        if await store.kv_get(ENTITY_NS, target.url) is None:
            raise EntityNotFound(f"no entity at {target.url}", url=target.url)
        raw = await store.kv_get(APPROVAL_NS, key)
        if raw is None:
            raise ApprovalNotFound(f"no approval {id!r} at {target.url}", url=target.url)
        approval = Approval.model_validate_json(raw)
        if approval.status != "pending":
            raise ApprovalNotPending(
                f"approval {id!r} was {approval.status} already", url=target.url
            )
        now = clock.now()
        status = "approved" if decision == "approve" else "denied"
        ops, decided = decision_ops(approval, raw, status, note, by, now)
        index = schedule_key(target.url, _timer_id(id))
        timer = await store.kv_get(SCHEDULE_NS, index)
        if timer is not None:  # its timeout can no longer deny it
            ops.extend(
                [
                    KvCheck(SCHEDULE_NS, index, timer),
                    *cancel_ops(target.url, _timer_id(id), timer.decode()),
                ]
            )
        try:
            await store.commit(ops)
        except ConditionFailed:
            continue  # decided at the same moment by someone else: look again
        except StreamClosed:
            raise EntityStopped(f"entity {target.url} was stopped", url=target.url) from None
        return decided


def decision_of(resume: Resumption | None, id: str) -> dict[str, Any] | None:
    """The decision taken for approval ``id`` (``{status, note, by}``), if any."""
    return None if resume is None else resume.decisions.get(id)


def approval_json(approval: Approval) -> dict[str, Any]:
    """An approval as the control plane answers it."""
    data: dict[str, Any] = orjson.loads(approval.model_dump_json(exclude={"kind", "v", "messages"}))
    return data
