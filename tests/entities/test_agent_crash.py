"""SIGKILL in the middle of an agent run: the redelivered wake re-uses the journaled model
responses and tool results, and calls the model only for what is missing. The model is the
official ``openai`` SDK talking to a local fake of the provider that counts its requests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from entities import Registry, Runtime

from ._fake_providers import FakeToolCall, FakeTurn, by_round, running_fake
from ._support import REPO, cli_env, entities_command

pytest.importorskip("openai")

APP = '''
import os, pathlib, time
from entities import HandlerContext, Registry, WakeEvent
from entities.agent import tool

@tool
def work(n: int) -> str:
    """One unit of work."""
    with open(os.environ["AGENT_TOOL_LOG"], "a") as log:
        log.write(f"{n}\\n")
    block = os.environ.get("AGENT_BLOCK_FILE", "")
    if n == 1 and block and os.path.exists(block):
        pathlib.Path(os.environ["AGENT_STARTED_FILE"]).write_text("in tool 1")
        time.sleep(600)  # the test kills the process here
    return f"work {n} done"

registry = Registry()

@registry.define("agent")
async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
    if wake.messages:
        ctx.use_agent("You do work.", model="openai:fake-model", tools=[work], max_rounds=6)
        await ctx.agent.run()
'''


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_run_reuses_the_journal(tmp_path: Path) -> None:
    app = tmp_path / "agent_app.py"
    app.write_text(APP)
    db = f"sqlite:///{tmp_path}/agent.db"
    tool_log = tmp_path / "tools.log"
    block = tmp_path / "block"
    started = tmp_path / "started"
    block.write_text("1")
    turns = by_round(
        FakeTurn(text="Starting. ", tool_calls=[FakeToolCall("work", {"n": 0})]),
        FakeTurn(text="Next. ", tool_calls=[FakeToolCall("work", {"n": 1})]),
        FakeTurn(text="Almost. ", tool_calls=[FakeToolCall("work", {"n": 2})]),
        FakeTurn(text="All done."),
    )
    with running_fake(turns, log_path=tmp_path / "requests.jsonl") as fake:
        env = cli_env()
        env.update(
            OPENAI_BASE_URL=fake.openai_base_url,
            OPENAI_API_KEY="test-key",
            AGENT_TOOL_LOG=str(tool_log),
            AGENT_BLOCK_FILE=str(block),
            AGENT_STARTED_FILE=str(started),
        )
        first = subprocess.Popen(
            [
                *entities_command(),
                "run",
                f"{app}:registry",
                "/agent/a1",
                "go",
                "--db",
                db,
                "--lease-seconds",
                "1",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for(started.exists, 60, "the run to reach tool 1")
            assert fake.count == 2  # two model calls so far, both journaled
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        block.unlink()
        worker = subprocess.Popen(
            [*entities_command(), "worker", f"{app}:registry", "--db", db, "--lease-seconds", "1"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            replies = anyio.run(_wait_for_reply, db)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        assert replies == ["All done."]
        rounds = [r.assistant_turns for r in fake.requests]
        assert rounds == [0, 1, 2, 3], rounds  # no journaled round was asked again
    # tool 0 ran once; tool 1 ran twice (the killed attempt never recorded it); tool 2 once
    assert tool_log.read_text().split() == ["0", "1", "1", "2"]


async def _wait_for_reply(db: str) -> list[object]:
    async with Runtime(Registry(), db) as rt:
        with anyio.fail_after(60):
            while True:
                events, _ = await rt.read("/agent/a1")
                keys = [e["key"] for e in events if e["type"] == "inbox"]
                if keys:
                    found = await rt.replies("/agent/a1", keys[0])
                    if found:
                        return found
                await anyio.sleep(0.1)
    return []  # pragma: no cover
