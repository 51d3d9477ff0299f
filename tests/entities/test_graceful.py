"""SIGTERM while a wake is in flight: the process drains and exits cleanly, and the message is
processed exactly once.

The app (written into ``tmp_path``) has a handler that records each execution in a file, sleeps
a second, then counts the message and replies. SIGTERM arrives while that sleep runs.
"""

from __future__ import annotations

import asyncio
import signal
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest

from entities import Registry, Runtime

from ._support import EntitiesProcess, free_port

pytestmark = pytest.mark.slow

T = TypeVar("T")

APP = """
from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel

from entities import HandlerContext, Registry, WakeEvent, collection

MARKS = Path({marks!r})


class Count(BaseModel):
    key: str
    value: int = 0


registry = Registry()


@registry.define("slow", state={{"counts": collection(Count, primary_key="key")}})
async def slow(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        with (MARKS / f"{{message.key}}.runs").open("a") as out:
            out.write("started\\n")
        await asyncio.sleep(1.0)
        current = ctx.db.collections.counts.get("n")
        if current is None:
            ctx.db.actions.counts_insert(row=Count(key="n", value=1))
        else:
            ctx.db.actions.counts_update(
                key="n", updater=Count(key="n", value=current.value + 1)
            )
        ctx.reply("done", to=message)
"""


def write_app(tmp_path: Path) -> tuple[str, Path]:
    marks = tmp_path / "marks"
    marks.mkdir()
    app = tmp_path / "slowapp.py"
    app.write_text(textwrap.dedent(APP.format(marks=str(marks))))
    return f"{app}:registry", marks


def load_registry(app: str) -> Registry:
    from entities.cli._app import load_registry as load

    return load(app)


def arun(fn: Callable[[Runtime], Awaitable[T]], app: str, db: str) -> T:
    async def main() -> T:
        async with Runtime(load_registry(app), db) as rt:
            return await fn(rt)

    return asyncio.run(main())


def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def outcome(rt: Runtime, url: str, key: str) -> tuple[list[Any], Any, bool]:
    """The replies to ``key``, the entity's count, and whether it is settled."""
    replies = await rt.replies(url, key)
    state = await rt.state_of(url)
    info = await rt.get(url)
    settled = not info.pending and info.status == "idle"
    return replies, state["counts"].get("n", {}).get("value"), settled


@pytest.fixture
def processes() -> Iterator[list[EntitiesProcess]]:
    started: list[EntitiesProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()


def test_sigterm_to_worker_mid_wake(tmp_path: Path, processes: list[EntitiesProcess]) -> None:
    app, marks = write_app(tmp_path)
    db = f"sqlite:///{tmp_path / 'g.db'}"

    async def prepare(rt: Runtime) -> str:
        await rt.spawn("/slow/s1")
        await rt.run_until_idle()  # the spawn's own (message-less) first wake
        return (await rt.send("/slow/s1", {"text": "hi"})).key

    key = arun(prepare, app, db)
    worker = EntitiesProcess(
        ["worker", app, "--db", db, "--lease-seconds", "2"], log=tmp_path / "worker.log"
    )
    processes.append(worker)
    worker.start()
    runs = marks / f"{key}.runs"
    wait_for(runs.exists, 20, "the wake to start")
    sent = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    code = worker.proc.wait(10)  # type: ignore[union-attr]
    elapsed = time.monotonic() - sent
    assert code == 0, worker.output()
    assert elapsed < 5, elapsed
    assert "Traceback" not in worker.output()

    replies, count, settled = arun(lambda rt: outcome(rt, "/slow/s1", key), app, db)
    if not replies:  # not finished before exit: a restarted worker must redeliver it
        again = EntitiesProcess(
            ["worker", app, "--db", db, "--lease-seconds", "2"], log=tmp_path / "worker2.log"
        )
        processes.append(again)
        again.start()

        def done() -> bool:
            return arun(lambda rt: outcome(rt, "/slow/s1", key), app, db)[2]

        wait_for(done, 20, "the redelivered wake")
        again.stop()
        replies, count, settled = arun(lambda rt: outcome(rt, "/slow/s1", key), app, db)
    assert replies == ["done"]
    assert count == 1
    assert settled
    assert runs.read_text().count("started") >= 1


def test_sigterm_to_serve_mid_wake_with_a_live_reader(
    tmp_path: Path, processes: list[EntitiesProcess]
) -> None:
    app, marks = write_app(tmp_path)
    db = f"sqlite:///{tmp_path / 'g.db'}"
    port = free_port()
    server = EntitiesProcess(
        ["serve", app, "--db", db, "--port", str(port), "--lease-seconds", "2"],
        log=tmp_path / "serve.log",
        port=port,
    )
    processes.append(server)
    server.start()
    base = f"http://127.0.0.1:{port}"
    with httpx2.Client(base_url=base, timeout=10) as http:
        assert http.put("/_entities/entities/slow/s1", json={}).status_code == 201
        sent = http.post("/_entities/entities/slow/s1/send", json={"payload": {"text": "x"}})
        assert sent.status_code == 202
        key = sent.json()["key"]
        runs = marks / f"{key}.runs"
        # A live SSE reader stays connected: shutdown must not wait for it forever.
        with http.stream(
            "GET",
            "/v1/stream/slow/s1/main",
            params={"offset": "-1", "live": "sse"},
            timeout=httpx2.Timeout(10, read=None),
        ) as tail:
            assert tail.status_code == 200
            wait_for(runs.exists, 20, "the wake to start")
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            lines = list(tail.iter_lines())  # the server ends the live response cleanly
            ended = time.monotonic() - started
            code = server.proc.wait(15)  # type: ignore[union-attr]
            elapsed = time.monotonic() - started
    assert "event: data" in lines
    assert ended < 3.5, ended  # not held until the 5 s graceful-shutdown timeout
    assert code == 0, server.output()
    assert elapsed < 6, elapsed
    assert "Traceback" not in server.output() and "ERROR" not in server.output()
    replies, count, settled = arun(lambda rt: outcome(rt, "/slow/s1", key), app, db)
    assert replies == ["done"], "the in-flight wake was not drained before exit"
    assert count == 1
    assert settled
    assert runs.read_text().count("started") == 1
