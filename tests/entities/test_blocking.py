"""Handlers cannot freeze the worker: a plain ``def`` handler runs on a thread (its blocking
calls hold no other wake), and the watchdog names an ``async def`` handler that blocks the
loop (a real worker over SQLite); and a real ``entities serve`` (SQLite, PostgreSQL) answers
HTTP while one of its handlers blocks its worker's loop."""

from __future__ import annotations

import asyncio
import logging
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx2
import pytest

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.server import ServeOptions, serve
from tests._stores import BACKENDS, drop_store, make_store_url

from ._support import EntitiesProcess, free_port

registry = Registry()
finished: dict[str, float] = {}


@registry.define("sync_sleeper")
def sync_sleeper(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        time.sleep(float(message.payload["seconds"]))
        finished[ctx.entity_url] = time.monotonic()
        ctx.reply("slept", to=message)


@registry.define("sync_stepper")
def sync_stepper(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        # the context's async methods, from the handler's thread: run on the worker's loop
        answer = anyio.from_thread.run(ctx.step, "answer", lambda: 41)
        ctx.reply(answer + 1, to=message)


@registry.define("where")
async def where(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        ctx.reply(threading.current_thread().name, to=message)


@registry.define("quick")
async def quick(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        finished[ctx.entity_url] = time.monotonic()
        ctx.reply("quick", to=message)


@registry.define("async_blocker")
async def async_blocker(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        time.sleep(float(message.payload["seconds"]))  # noqa: ASYNC251 (the mistake named)
        ctx.reply("blocked", to=message)


async def until(check: Callable[[], Any], seconds: float = 20.0) -> None:
    with anyio.fail_after(seconds):
        while True:
            if check():
                return
            await anyio.sleep(0.01)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    finished.clear()


async def test_a_sync_handler_that_sleeps_holds_no_other_wake(tmp_path: Path) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path / 'b.db'}") as rt:
        await rt.spawn("/sync_sleeper/s")
        await rt.spawn("/quick/q")
        await rt.run_until_idle()  # the spawns' own first wakes
        stop = anyio.Event()
        worker = rt.worker(poll_interval=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            sent = time.monotonic()
            slow = await rt.send("/sync_sleeper/s", {"seconds": 1.0})
            await anyio.sleep(0.1)  # the sleeper is running now
            fast = await rt.send("/quick/q", {})
            await until(lambda: "/quick/q" in finished)
            assert "/sync_sleeper/s" not in finished  # the quick one did not wait for it
            assert finished["/quick/q"] - sent < 0.8
            await until(lambda: "/sync_sleeper/s" in finished)
            assert finished["/sync_sleeper/s"] - sent >= 1.0
            stop.set()
        assert await rt.replies("/sync_sleeper/s", slow.key) == ["slept"]
        assert await rt.replies("/quick/q", fast.key) == ["quick"]


async def test_a_sync_handler_awaits_the_context_through_from_thread(tmp_path: Path) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path / 'b.db'}") as rt:
        await rt.spawn("/sync_stepper/s")
        receipt = await rt.send("/sync_stepper/s", {})
        await rt.run_until_idle()
        assert await rt.replies("/sync_stepper/s", receipt.key) == [42]
        events, _ = await rt.read("/sync_stepper/s", "-1")
        assert [e["value"]["result"] for e in events if e["type"] == "steps"] == [41]


async def test_the_watchdog_names_a_handler_that_blocks_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="entities.worker")
    async with Runtime(registry, f"sqlite:///{tmp_path / 'b.db'}") as rt:
        await rt.spawn("/async_blocker/a")
        await rt.run_until_idle()
        stop = anyio.Event()
        worker = rt.worker(poll_interval=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            receipt = await rt.send("/async_blocker/a", {"seconds": 1.6})
            await until(lambda: worker.wakes >= 1)
            await anyio.sleep(0.3)  # the watchdog's thread logs the end of the episode
            stop.set()
        assert await rt.replies("/async_blocker/a", receipt.key) == ["blocked"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per episode
    message = warnings[0].getMessage()
    assert "the handler of /async_blocker/a has blocked the worker's event loop" in message
    assert "test_blocking.py" in message and "async_blocker" in message  # where it blocks
    assert worker.watchdog.episodes == 1
    assert any("runs again after" in r.getMessage() for r in caplog.records)


async def test_a_quick_handler_wakes_no_watchdog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path / 'b.db'}") as rt:
        await rt.spawn("/async_blocker/a")
        await rt.run_until_idle()
        stop = anyio.Event()
        worker = rt.worker(poll_interval=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            await rt.send("/async_blocker/a", {"seconds": 0.3})
            await until(lambda: worker.wakes >= 1)
            await anyio.sleep(0.6)
            stop.set()
    assert worker.watchdog.episodes == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


BLOCKING_APP = """
from __future__ import annotations

import time
from pathlib import Path

from entities import HandlerContext, Registry, WakeEvent

MARKS = Path({marks!r})

registry = Registry()


@registry.define("blocker")
async def blocker(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        (MARKS / "started").write_text("started")
        time.sleep(3.0)  # blocks the worker's event loop, not the server's
        ctx.reply("done", to=message)
"""


def timed_get(http: httpx2.Client, path: str, **params: str) -> float:
    began = time.monotonic()
    response = http.get(path, params=params)
    assert response.status_code == 200, response.text
    return time.monotonic() - began


@pytest.mark.slow
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "memory"])
def test_a_blocking_handler_does_not_freeze_entities_serve(backend: str, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    app = tmp_path / "blockapp.py"
    app.write_text(textwrap.dedent(BLOCKING_APP.format(marks=str(marks))))
    port = free_port()
    db = make_store_url(backend, tmp_path)
    server = EntitiesProcess(
        ["serve", f"{app}:registry", "--db", db, "--port", str(port)],
        log=tmp_path / "serve.log",
        port=port,
    )  # fmt: skip
    try:
        server.start()
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.put("/_entities/entities/blocker/b1", json={}).status_code == 201
            sent = http.post("/_entities/entities/blocker/b1/send", json={"payload": {}})
            assert sent.status_code == 202
            deadline = time.monotonic() + 20
            while not (marks / "started").exists():
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.02)
            began = time.monotonic()
            latencies = [
                timed_get(http, "/_entities/types"),
                timed_get(http, "/v1/stream/blocker/b1/main", offset="-1"),
                timed_get(http, "/_entities/entities/blocker/b1"),
                timed_get(http, "/readyz"),
            ]
            assert time.monotonic() - began < 2.0  # all answered while the handler blocked
            assert max(latencies) < 0.5, latencies
            key = sent.json()["key"]
            replied = http.get(
                f"/_entities/entities/blocker/b1/replies/{key}", params={"wait_ms": "15000"}
            )
            assert replied.json()["replies"] == ["done"], replied.text  # the wake completes
        server.stop()
        assert server.proc is not None and server.proc.returncode == 0, server.output()
        output = server.output()
        assert "Traceback" not in output
        assert "the handler of /blocker/b1 has blocked the worker's event loop" in output
        assert "blockapp.py" in output
    finally:
        server.kill()
        asyncio.run(drop_store(db))


@pytest.mark.parametrize(
    ("scheme", "thread"), [("sqlite", "entities-worker"), ("memory", "MainThread")]
)
async def test_serve_runs_its_worker_on_a_thread_of_its_own(
    scheme: str, thread: str, tmp_path: Path
) -> None:
    """Over a store that can be opened twice, the wakes of ``serve()`` run on the worker's
    thread (and the thread ends with ``serve``); over ``memory://``, on the server's loop."""
    url = f"sqlite:///{tmp_path / 'e.db'}" if scheme == "sqlite" else "memory://"
    base: list[str] = []
    async with Runtime(registry, url) as rt, anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(rt, ServeOptions(port=0), ready=base.append))
        await until(lambda: base)
        async with httpx2.AsyncClient(base_url=base[0], timeout=10) as http:
            assert (await http.put("/_entities/entities/where/w", json={})).status_code == 201
            sent = await http.post("/_entities/entities/where/w/send", json={"payload": {}})
            key = sent.json()["key"]
            replied = await http.get(
                f"/_entities/entities/where/w/replies/{key}", params={"wait_ms": "10000"}
            )
            assert replied.json()["replies"] == [thread]
            assert (await http.get("/readyz")).status_code == 200
        tg.cancel_scope.cancel()
    assert not [t for t in threading.enumerate() if t.name == "entities-worker"]
