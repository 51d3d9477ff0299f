"""Durable approvals: a tool call marked ``requires_approval`` suspends the run (no lease, no
worker held) until a person decides; the run then goes on from its journal (no model round is
called again), the tool runs or the model hears "not approved", and the final reply answers
the original message. Also after a SIGKILL of the server while an approval is pending."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from entities import (
    ApprovalNotFound,
    ApprovalNotPending,
    HandlerContext,
    InvalidDecision,
    Registry,
    Runtime,
    VirtualClock,
    WakeEvent,
)
from entities._approvals import APPROVAL_NS
from entities._records import ENTITY_NS, EntityRecord
from entities.agent import ModelResponse, ScriptRequest, ToolCall, tool
from examples import approval as example

from ._support import EntitiesProcess, free_port

calls: list[str] = []  # what the model was called with (the last user text)
ran: list[str] = []  # the tool's runs


@tool(requires_approval=lambda args: args.get("amount", 0) > 100)
def pay(amount: int) -> str:
    """Pay an amount (over 100 needs approval)."""
    ran.append(f"pay {amount}")
    return f"paid {amount}"


def model(request: ScriptRequest) -> Any:
    calls.append(request.last_user_text)
    if request.tool_results:
        return f"result: {request.tool_results[-1].content}"
    amount = int(request.last_user_text.split()[-1])
    return ModelResponse(tool_calls=(ToolCall(f"c{amount}", "pay", {"amount": amount}),))


@tool(requires_approval=True, approval_timeout=60)
def transfer(amount: int) -> str:
    """Transfer an amount (a person has a minute to approve)."""
    ran.append(f"transfer {amount}")
    return f"transferred {amount}"


def transfer_model(request: ScriptRequest) -> Any:
    calls.append(request.last_user_text)
    if request.tool_results:
        return f"result: {request.tool_results[-1].content}"
    amount = int(request.last_user_text.split()[-1])
    return ModelResponse(tool_calls=(ToolCall(f"t{amount}", "transfer", {"amount": amount}),))


registry = Registry().include(example.registry)


@registry.define("transferer")
async def transferer(ctx: HandlerContext, wake: WakeEvent) -> None:
    if not wake.messages:
        return
    ctx.use_agent(system_prompt="transfer", tools=[transfer], test_responses=transfer_model)
    await ctx.agent.run()


@registry.define("payer")
async def payer(ctx: HandlerContext, wake: WakeEvent) -> None:
    if not wake.messages:
        return
    ctx.use_agent(system_prompt="pay", tools=[pay], test_responses=model)
    await ctx.agent.run()


@pytest.fixture(autouse=True)
def _fresh() -> None:
    calls.clear()
    ran.clear()


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[Runtime]:
    async with Runtime(registry, store_url, clock=VirtualClock()) as runtime:
        yield runtime


async def test_an_approved_call_runs_and_the_reply_answers_the_message(rt: Runtime) -> None:
    await rt.spawn("/approval/a")
    sent = await rt.send("/approval/a", {"text": "delete notes.txt"})
    await rt.run_until_idle()
    [pending] = await rt.approvals("/approval/a")
    assert (pending.status, pending.tool, pending.arguments) == (
        "pending",
        "delete_file",
        {"path": "notes.txt"},
    )
    outcome = await rt.outcome("/approval/a", sent.key)
    assert outcome.status == "waiting_approval" and not outcome.failed and outcome.replies == []
    record = EntityRecord.load(await rt.store.kv_get(ENTITY_NS, "/approval/a") or b"")
    assert (record.owner, record.inflight, record.status) == (None, None, "idle")  # nothing held
    decided = await rt.decide("/approval/a", pending.id, "approve", by="alice")
    assert decided.status == "approved" and decided.decided_by == "alice"
    await rt.run_until_idle()
    assert await rt.replies("/approval/a", sent.key) == ["Done: deleted notes.txt."]
    outcome = await rt.outcome("/approval/a", sent.key)
    assert outcome.status == "completed"
    events, _ = await rt.read("/approval/a", "-1", limit=10_000)
    models = [e for e in events if e["type"] == "steps" and ".model" in e["key"]]
    assert sorted(e["value"]["name"].rsplit(".", 1)[1] for e in models) == ["model0", "model1"]
    with pytest.raises(ApprovalNotPending):
        await rt.decide("/approval/a", pending.id, "deny")


async def test_a_denied_call_goes_back_to_the_model_as_not_approved(rt: Runtime) -> None:
    await rt.spawn("/approval/d")
    sent = await rt.send("/approval/d", {"text": "delete notes.txt"})
    await rt.run_until_idle()
    [pending] = await rt.approvals("/approval/d")
    await rt.decide("/approval/d", pending.id, "deny", note="keep it", by="bob")
    await rt.run_until_idle()
    [reply] = await rt.replies("/approval/d", sent.key)
    assert "not approved" in reply and "keep it" in reply and "by bob" in reply
    assert [a.status for a in await rt.approvals("/approval/d")] == ["denied"]


async def test_a_predicate_decides_which_calls_wait(rt: Runtime) -> None:
    await rt.spawn("/payer/p")
    small = await rt.send("/payer/p", {"text": "pay 5"})
    await rt.run_until_idle()
    assert await rt.replies("/payer/p", small.key) == ["result: paid 5"]
    assert await rt.approvals("/payer/p") == []
    calls.clear()
    big = await rt.send("/payer/p", {"text": "pay 500"})
    await rt.run_until_idle()
    assert ran == ["pay 5"] and calls == ["pay 500"]  # the model asked; the tool waits
    [pending] = await rt.approvals("/payer/p")
    await rt.decide("/payer/p", pending.id, "approve")
    await rt.run_until_idle()
    assert ran == ["pay 5", "pay 500"]
    assert calls == ["pay 500", "pay 500"]  # round 0 came from the journal: one call after
    assert await rt.replies("/payer/p", big.key) == ["result: paid 500"]


async def test_messages_while_waiting_run_on_their_own(rt: Runtime) -> None:
    """The entity is not blocked: another message runs while the approval is pending, and
    the resumed run takes nothing else with it."""
    await rt.spawn("/payer/q")
    big = await rt.send("/payer/q", {"text": "pay 900"})
    await rt.run_until_idle()
    small = await rt.send("/payer/q", {"text": "pay 1"})
    await rt.run_until_idle()
    assert await rt.replies("/payer/q", small.key) == ["result: paid 1"]
    [pending] = await rt.approvals("/payer/q")
    later = await rt.send("/payer/q", {"text": "pay 2"})  # queued before the decision
    await rt.decide("/payer/q", pending.id, "approve")
    await rt.run_until_idle()
    assert await rt.replies("/payer/q", big.key) == ["result: paid 900"]
    assert await rt.replies("/payer/q", later.key) == ["result: paid 2"]
    assert ran == ["pay 1", "pay 2", "pay 900"]


async def test_an_approval_not_decided_in_time_is_denied(rt: Runtime) -> None:
    clock = rt.clock
    assert isinstance(clock, VirtualClock)
    await rt.spawn("/transferer/t")
    sent = await rt.send("/transferer/t", {"text": "transfer 70"})
    await rt.run_until_idle()
    [pending] = await rt.approvals("/transferer/t")
    assert pending.expires_at is not None and pending.expires_at - pending.requested_at == 60
    clock.advance(30)
    await rt.run_until_idle()
    assert (await rt.approvals("/transferer/t"))[0].status == "pending"
    clock.advance(31)
    await rt.run_until_idle()
    [denied] = await rt.approvals("/transferer/t")
    assert (denied.status, denied.decided_by) == ("denied", "timeout")
    assert denied.note == "timed out: no decision within 60 s"
    [reply] = await rt.replies("/transferer/t", sent.key)
    assert "not approved by timeout: timed out" in reply and ran == []
    with pytest.raises(ApprovalNotPending):
        await rt.decide("/transferer/t", denied.id, "approve")


async def test_a_decision_in_time_cancels_the_timeout(rt: Runtime) -> None:
    clock = rt.clock
    assert isinstance(clock, VirtualClock)
    await rt.spawn("/transferer/u")
    sent = await rt.send("/transferer/u", {"text": "transfer 5"})
    await rt.run_until_idle()
    [pending] = await rt.approvals("/transferer/u")
    await rt.decide("/transferer/u", pending.id, "approve")
    await rt.run_until_idle()
    assert await rt.replies("/transferer/u", sent.key) == ["result: transferred 5"]
    clock.advance(120)  # the timeout's time passes: nothing fires
    await rt.run_until_idle()
    [approved] = await rt.approvals("/transferer/u")
    assert approved.status == "approved" and ran == ["transfer 5"]
    assert await rt.replies("/transferer/u", sent.key) == ["result: transferred 5"]


def test_the_timeout_is_checked_at_definition() -> None:
    with pytest.raises(ValueError, match="approval_timeout"):
        tool(requires_approval=True, approval_timeout=0)(lambda: None)


async def test_suspended_and_resumed_wakes_replay_without_divergence(rt: Runtime) -> None:
    await rt.spawn("/payer/r")
    await rt.send("/payer/r", {"text": "pay 700"})
    await rt.run_until_idle()
    replayed = await rt.replay("/payer/r")  # the suspended wake waits again: no divergence
    assert replayed.ok, replayed
    [pending] = await rt.approvals("/payer/r")
    await rt.decide("/payer/r", pending.id, "approve")
    await rt.run_until_idle()
    await rt.send("/payer/r", {"text": "pay 800"})
    await rt.run_until_idle()
    [_, second] = await rt.approvals("/payer/r")
    await rt.decide("/payer/r", second.id, "deny", note="no")
    await rt.run_until_idle()
    replayed = await rt.replay("/payer/r")
    statuses = [w.status for w in replayed.wakes]
    assert statuses.count("waiting_approval") == 2 and replayed.ok, replayed


async def test_bad_decisions_change_nothing(rt: Runtime) -> None:
    await rt.spawn("/approval/b")
    await rt.send("/approval/b", {"text": "delete a.txt"})
    await rt.run_until_idle()
    [pending] = await rt.approvals("/approval/b")
    before = await rt.store.kv_scan(APPROVAL_NS)
    with pytest.raises(ApprovalNotFound):
        await rt.decide("/approval/b", "nope", "approve")
    with pytest.raises(InvalidDecision):
        await rt.decide("/approval/b", pending.id, "maybe")
    assert await rt.store.kv_scan(APPROVAL_NS) == before


def test_a_pending_approval_survives_a_sigkill(tmp_path: Path) -> None:
    """The server is SIGKILLed while an approval is pending; after a restart, approving it
    resumes the run without calling the model again for the first round."""
    db = f"sqlite:///{tmp_path / 'a.db'}"
    port = free_port()

    def server() -> EntitiesProcess:
        return EntitiesProcess(
            ["serve", "examples.approval:registry", "--db", db, "--port", str(port)],
            log=tmp_path / "serve.log",
            port=port,
        )

    async def scenario() -> None:
        base = f"http://127.0.0.1:{port}/_entities/entities/approval/k"
        first = server()
        first.start()
        try:
            async with httpx2.AsyncClient(timeout=10) as http:
                assert (await http.put(base, json={})).status_code == 201
                sent = await http.post(base + "/send", json={"payload": {"text": "delete x.md"}})
                key = sent.json()["key"]
                with anyio.fail_after(15):
                    listed: list[Any] = []
                    while not listed:
                        listed = (await http.get(base + "/approvals")).json()
                        await anyio.sleep(0.05)
                [pending] = listed
        finally:
            assert first.proc is not None
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()
        second = server()
        second.start()
        try:
            async with httpx2.AsyncClient(timeout=10) as http:
                decided = await http.post(
                    base + f"/approvals/{pending['id']}", json={"decision": "approve"}
                )
                assert decided.status_code == 200 and decided.json()["status"] == "approved"
                again = await http.post(
                    base + f"/approvals/{pending['id']}", json={"decision": "deny"}
                )
                assert again.status_code == 409
                answer = await http.get(base + f"/replies/{key}", params={"wait_ms": 10_000})
                assert answer.json()["replies"] == ["Done: deleted x.md."]
                stream = await http.get(
                    f"http://127.0.0.1:{port}/v1/stream/approval/k/main", params={"offset": "-1"}
                )
                steps = [e for e in stream.json() if e["type"] == "steps"]
                names = [e["value"]["name"] for e in steps]
                assert sum(n.endswith(".model0") for n in names) == 1  # not called again
                assert sum(n.endswith(".model1") for n in names) == 1
        finally:
            second.stop()

    asyncio.run(scenario())
