"""Replay: re-execute recorded wakes against their journal and report any divergence.

A wake's inputs are all in its entity's stream: the state before it (the fold up to its
``to_offset``), its events (``from_offset``, ``to_offset``], and its journal (``steps`` written
under its wake id). Replay rebuilds them, runs the handler with a context that never calls out (a
step missing from the journal is a divergence, not a call), and compares what the handler did
with what the wake committed (every change event carries the wake id as ``txid``): state writes,
replies, tags, manifest entries, tool calls, sends and spawns. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pydantic import ValidationError

from streams import Store

from ._approvals import ApprovalPending, resumption
from ._compaction import Marks, marks
from ._context import HandlerContext
from ._effects import Effects
from ._errors import EntitiesError, JournalCompacted, MigrationFailed, ReplayDivergence
from ._host import Host
from ._migrations import VERSION_KEY, stored_row
from ._pipeline.load import copy_view, view_fold, wake_event
from ._records import WAKE_TYPES, Inflight
from ._registry import EntityType, Registry
from ._urls import EntityURL, parse_url

__all__ = ["Divergence", "ReplayHost", "ReplayReport", "WakeReplay", "replay"]


class ReplayHost(Host, Protocol):
    """What replay needs (a :class:`~entities.Runtime` is one): the registry and reads."""

    @property
    def registry(self) -> Registry: ...

    @property
    def store(self) -> Store: ...


# what a wake's commit holds that replay compares (live progress and bookkeeping excluded)
_NOT_COMPARED = frozenset({"steps", "text_deltas", "runs", "errors", "wakes", "inbox"})


def _compared(type_: str) -> bool:
    return type_ not in _NOT_COMPARED


@dataclass(frozen=True, slots=True)
class Divergence:
    """One difference between a recorded wake and its replay."""

    wake_id: str
    where: str  # e.g. "state:totals/total", "step w0-2.agent1.model1", "sends[0]"
    expected: Any
    got: Any
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "wake_id": self.wake_id,
            "where": self.where,
            "expected": self.expected,
            "got": self.got,
            "message": self.message,
        }


@dataclass(slots=True)
class WakeReplay:
    """The replay of one recorded wake."""

    index: int
    wake_id: str
    status: str
    divergences: list[Divergence] = field(default_factory=list)
    compacted: str | None = None  # why it was not replayed: compaction removed its inputs

    @property
    def ok(self) -> bool:
        return not self.divergences


@dataclass(slots=True)
class ReplayReport:
    """What :func:`replay` found."""

    url: str
    wakes: list[WakeReplay] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(w.ok for w in self.wakes)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ok": self.ok,
            "wakes": [
                {
                    "index": w.index,
                    "wake_id": w.wake_id,
                    "status": w.status,
                    "ok": w.ok,
                    "compacted": w.compacted,
                    "divergences": [d.to_json() for d in w.divergences],
                }
                for w in self.wakes
            ],
        }


def _recorded_runs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The final run record of every wake that ran the handler, in order."""
    runs: dict[str, dict[str, Any]] = {}
    for e in events:
        value = e.get("value") or {}
        if e["type"] == "runs" and value.get("wake_id") == e["key"]:
            if value.get("status") in ("completed", "dead_lettered", "waiting_approval"):
                runs[e["key"]] = value
    return list(runs.values())


async def replay(
    rt: ReplayHost, url: str, *, wake: int | str | None = None, last: int | None = None
) -> ReplayReport:
    """Replay the recorded wakes of ``url`` (all, the N-th (1-based), one wake id, or the
    ``last`` N).

    Wakes whose inputs compaction removed (a journal older than the type's replay window, or
    history before a truncated prefix) are not replayed: the report says so (``compacted``).
    Wake numbers count the wakes still recorded.

    Raises:
        EntityNotFound: no entity at ``url``.
        EntitiesError: no such wake.
        JournalCompacted: the one wake asked for was compacted.
    """
    target = parse_url(url)
    entity_type = rt.registry.get(target.type)
    events: list[dict[str, Any]] = []
    offset = "-1"
    while True:
        batch, offset = await rt.read(target.url, offset, limit=5000)
        events.extend(batch)
        if len(batch) < 5000:
            break
    runs = _recorded_runs(events)
    chosen = list(enumerate(runs, start=1))
    if wake is not None:
        chosen = [(i, r) for i, r in chosen if wake in (i, r["wake_id"], str(i))]
        if not chosen:
            raise EntitiesError(
                f"{target.url} has no recorded wake {wake!r} ({len(runs)} wakes)", url=target.url
            )
    if last is not None:
        chosen = chosen[-last:] if last > 0 else []
    left = await marks(rt.store, target.url)
    report = ReplayReport(target.url)
    for index, run in chosen:
        why = _compacted(left, run)
        if why is not None and wake is not None:
            raise JournalCompacted(f"wake {run['wake_id']} of {target.url}: {why}", url=target.url)
        if why is not None:
            report.wakes.append(WakeReplay(index, run["wake_id"], run["status"], compacted=why))
            continue
        report.wakes.append(await _replay_one(rt, entity_type, target, events, index, run, left))
    return report


def _compacted(left: Marks, run: dict[str, Any]) -> str | None:
    """Why compaction put the wake of ``run`` out of replay's reach, if it did."""
    if left.base is not None and run["from_offset"] < left.base[0]:
        return "the history before it was truncated (retention keep_for); it cannot be replayed"
    end = run["to_offset"]
    if end != "-1" and int(end.rsplit("_", 1)[1]) <= left.journal_through:
        return "its journal was compacted (older than the replay window); it cannot be replayed"
    return None


@dataclass(slots=True)
class _Inputs:
    """What a recorded wake started from: the view at the end of its range, its events, its
    journal, and the writes it committed (to compare with)."""

    view: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]
    journal: dict[str, Any]
    recorded: list[dict[str, Any]]


def _inputs(events: list[dict[str, Any]], run: dict[str, Any], left: Marks) -> _Inputs:
    wake_id, low, high = run["wake_id"], run["from_offset"], run["to_offset"]
    # a truncated stream's history starts from the snapshot the cut relied on
    view = view_fold() if left.base is None else view_fold(copy_view(left.base[1]), left.base[0])
    found = _Inputs(view.collections, [], {}, [])
    for e in events:
        type_ = e["type"]
        if e["offset"] <= high:
            view.apply(e)
            if low == "-1" or e["offset"] > low:
                found.events.append(e)
        value = e.get("value") or {}
        if type_ == "steps" and value.get("wake_id") == wake_id:
            found.journal[value["name"]] = value.get("result")
        if (e.get("headers") or {}).get("txid") == wake_id and _compared(type_):
            found.recorded.append(e)
    return found


def _resumed(
    events: list[dict[str, Any]], origin: str, high: str
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """For a wake that resumed the run begun in wake ``origin``: that run's journal, the
    writes it committed (they carry ``origin`` as their ``txid``), and the decisions on its
    approvals taken by the end of the wake's range (``high``)."""
    journal: dict[str, Any] = {}
    recorded: list[dict[str, Any]] = []
    decided: dict[str, dict[str, Any]] = {}
    for e in events:
        value = e.get("value") or {}
        if e["type"] == "steps" and value.get("wake_id") == origin:
            journal[value["name"]] = value.get("result")
        elif (e.get("headers") or {}).get("txid") == origin and _compared(e["type"]):
            recorded.append(e)
        elif (
            e["type"] == "approvals"
            and e["offset"] <= high
            and value.get("origin") == origin
            and value.get("status") in ("approved", "denied")
        ):
            decided[e["key"]] = {
                "status": value["status"], "note": value.get("note"), "by": value.get("decided_by")
            }  # fmt: skip
    return journal, recorded, decided


async def _replay_one(
    rt: ReplayHost,
    entity_type: EntityType,
    target: EntityURL,
    events: list[dict[str, Any]],
    index: int,
    run: dict[str, Any],
    left: Marks,
) -> WakeReplay:
    wake_id, low, high = run["wake_id"], run["from_offset"], run["to_offset"]
    inputs = _inputs(events, run, left)
    result = WakeReplay(index, wake_id, run["status"])
    wake_events = [e for e in inputs.events if e["type"] in WAKE_TYPES]
    if not wake_events:
        return result
    inflight = Inflight(
        wake_id=wake_id, from_offset=low, to_offset=high, attempt=int(run.get("attempt", 1))
    )
    wake = wake_event(
        target, inflight, inputs.events, wake_events, first_wake=not inputs.view.get("manifests")
    )
    runs_before = sum(1 for r in _recorded_runs(events) if r["to_offset"] < low or r is run) - 1
    run_id, journal, resume = wake_id, inputs.journal, resumption(wake)
    if resume is not None:  # it went on with a run suspended for approvals, as that run
        run_id, runs_before = resume.origin, resume.runs_before
        journal, inputs.recorded, decided = _resumed(events, resume.origin, high)
        resume = replace(resume, decisions={**resume.decisions, **decided})

    async def nowhere(changes: list[dict[str, Any]]) -> None:
        return None

    ctx = HandlerContext(
        host=rt,
        entity_type=entity_type,
        url=target,
        view=inputs.view,
        wake=wake,
        events=inputs.events,
        journal=journal,
        run_id=run_id,
        flush=nowhere,
        runs_before=max(0, runs_before),
        replaying=True,
    )
    ctx.resumption = resume
    failed: BaseException | None = None
    try:
        await entity_type.invoke(ctx, wake)
    except ReplayDivergence as exc:
        result.divergences.append(
            Divergence(wake_id, "journal", "recorded", "missing", exc.message)
        )
        return result
    except ApprovalPending:  # it waits for a person again: so did the wake
        if run["status"] != "waiting_approval":
            result.divergences.append(
                Divergence(wake_id, "outcome", run["status"], "waiting_approval",
                           "the replay waits for an approval; the recorded wake did not")
            )  # fmt: skip
        return result
    except Exception as exc:
        failed = exc
    if run["status"] == "waiting_approval":
        result.divergences.append(
            Divergence(wake_id, "outcome", "waiting_approval", "finished",
                       "the recorded wake waited for an approval; the replay did not")
        )  # fmt: skip
        return result
    if _outcome_differs(result, run, failed):
        return result
    got = [c for c in ctx.effects.own if _compared(c["type"])]
    try:
        recorded = [_shape(_current(entity_type, target, e)) for e in inputs.recorded]
    except MigrationFailed as exc:
        result.divergences.append(Divergence(wake_id, "migration", None, None, exc.message))
        return result
    _compare(result, wake_id, recorded, [_shape(c) for c in got])
    _compare_effects(result, run, ctx.effects)
    return result


def _outcome_differs(result: WakeReplay, run: dict[str, Any], failed: BaseException | None) -> bool:
    """Record a divergence of outcome (failure against success); ``True`` when the wake's
    writes are not worth comparing (it failed, either way)."""
    wake_id = run["wake_id"]
    if run["status"] == "dead_lettered":
        if failed is None:
            result.divergences.append(
                Divergence(
                    wake_id,
                    "outcome",
                    "failure",
                    "success",
                    "the recorded wake failed; the replay did not",
                )
            )
        return True
    if failed is not None:
        result.divergences.append(
            Divergence(wake_id, "outcome", "success", repr(failed), f"the replay raised {failed!r}")
        )
        return True
    return False


def _compare_effects(result: WakeReplay, run: dict[str, Any], effects: Effects) -> None:
    """Compare the sends and spawns of the replay with those the run recorded."""
    wake_id = run["wake_id"]
    expected_sends = run.get("sends", [])
    got_sends = [[s.target.url, s.message_type, s.payload] for s in effects.sends]
    for i in range(max(len(expected_sends), len(got_sends))):
        want = expected_sends[i] if i < len(expected_sends) else None
        have = got_sends[i] if i < len(got_sends) else None
        if want != have:
            result.divergences.append(
                Divergence(wake_id, f"sends[{i}]", want, have, "a different message was sent")
            )
    expected_spawns = run.get("spawns", [])
    got_spawns = [s.target.url for s in effects.spawns]
    if expected_spawns != got_spawns:
        result.divergences.append(
            Divergence(
                wake_id, "spawns", expected_spawns, got_spawns, "different children were spawned"
            )
        )


def _current(entity_type: EntityType, target: EntityURL, event: dict[str, Any]) -> dict[str, Any]:
    """A recorded write of a state row as the code being replayed would write it: upgraded to
    its collection's version and read through its model (so a field added with a default, or
    filled in by a migration, is no divergence). A row the model refuses is left as recorded.

    Raises:
        MigrationFailed: the row's migration raised.
    """
    value = event.get("value")
    if not isinstance(value, dict):
        return event
    for name, definition in entity_type.state.items():
        if definition.event_type(name) == event["type"]:
            row = definition.upgrade(name, event["key"], value, url=target.url)
            try:
                model = definition.model.model_validate(stored_row(row))
            except ValidationError:
                return {**event, "value": row}
            data = model.model_dump(mode="json")
            if definition.version > 1:
                data[VERSION_KEY] = definition.version
            return {**event, "value": data}
    return event


def _shape(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": event["type"],
        "key": event["key"],
        "operation": event["headers"]["operation"],
        "value": _stable(event.get("value")),
    }


def _stable(value: Any) -> Any:
    """A value with timing fields (which legitimately differ) blanked."""
    if isinstance(value, dict):
        return {
            k: None if k in {"duration_ms", "started_at", "ended_at"} else _stable(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _compare(
    result: WakeReplay, wake_id: str, expected: list[dict[str, Any]], got: list[dict[str, Any]]
) -> None:
    for i in range(max(len(expected), len(got))):
        want = expected[i] if i < len(expected) else None
        have = got[i] if i < len(got) else None
        if want == have:
            continue
        ref = want or have or {}
        where = f"{ref.get('type')}/{ref.get('key')}"
        if want is None:
            message = f"the replay wrote {where} which the wake did not"
        elif have is None:
            message = f"the wake wrote {where} which the replay did not"
        else:
            message = f"write #{i + 1} differs at {where}"
        result.divergences.append(Divergence(wake_id, where, want, have, message))
        return  # the first difference; later ones usually follow from it
