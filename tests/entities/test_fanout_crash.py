"""``entities run`` of the fan-out example, SIGKILLed after the children finished and before the
parent's wake commits, then recovered on the same SQLite file.

The app wraps ``examples.fanout``: on the parent's first wake that carries a ``finished_child``
with a response, while a marker file exists, the parent deletes the marker and SIGKILLs its own
process. The dead process still holds the parent's lease (1 s here, ``--lease-seconds``). A
worker started afterwards over the same file must redeliver that wake, and the original job
must get exactly one reply, 55, with every child's result recorded once and no committed child
wake run again.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import orjson
import pytest

from entities import Registry, Runtime

from ._support import REPO, cli_env, entities_command

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")

N = 5

APP = textwrap.dedent(
    """
    from __future__ import annotations

    import os
    import signal
    from pathlib import Path

    from entities import Registry, collection
    from examples.fanout import Job, Pending, Result, Square, fanout, square

    HERE = Path(__file__).resolve().parent
    MARKER = HERE / "crash.marker"
    TICKS = HERE / "ticks.log"


    async def counted_square(ctx, wake):
        if any(m.payload.get("tick") for m in wake.messages):
            with TICKS.open("a") as out:  # one line per execution of a child's tick wake
                out.write(f"{ctx.entity_url} {os.getpid()}\\n")
        await square(ctx, wake)


    async def crashing_fanout(ctx, wake):
        finished = [e.get("finished_child") or {} for e in wake.wakes]
        if MARKER.exists() and any(f.get("response") is not None for f in finished):
            MARKER.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        await fanout(ctx, wake)


    registry = Registry()
    registry.define("square", handler=counted_square, args_schema=Square)
    registry.define(
        "fanout",
        handler=crashing_fanout,
        state={"results": collection(Result), "jobs": collection(Pending)},
        inbox=Job,
    )
    """
)


def _load(path: Path) -> ModuleType:
    """Import the app written to ``path``, by file, as ``entities run`` loaded it in the killed
    process (it lives in the test's directory, next to its marker and tick log). What it imports,
    ``examples.fanout``, comes from the repository root: pytest's ``pythonpath``."""
    spec = importlib.util.spec_from_file_location(f"_fanout_crash_app_{id(path)}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _events(rt: Runtime, url: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    offset = "-1"
    while True:
        batch, offset = await rt.read(url, offset, limit=1000)
        found.extend(batch)
        if len(batch) < 1000:
            return found


def _ticks(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    lines = path.read_text().split()
    return [(url, int(pid)) for url, pid in zip(lines[::2], lines[1::2], strict=True)]


def test_parent_killed_after_children_finished_recovers_exactly_once(tmp_path: Path) -> None:
    app = tmp_path / "crash_app.py"
    app.write_text(APP)
    marker = tmp_path / "crash.marker"
    marker.touch()
    db = f"sqlite:///{tmp_path / 'f.db'}"
    job = {"n": N, "delay_ms": 100}

    proc = subprocess.run(
        [
            *entities_command(),
            "run",
            f"{app}:registry",
            "/fanout/f1",
            orjson.dumps(job).decode(),
            "--json",
            "--db",
            db,
            "--lease-seconds",
            "1",
            "--timeout",
            "60",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""  # it died before any reply was printed
    assert not marker.exists()

    registry = _load(app).registry
    assert isinstance(registry, Registry)
    anyio.run(_recover, registry, db, tmp_path)


async def _recover(registry: Registry, db: str, tmp_path: Path) -> None:
    ticks_log = tmp_path / "ticks.log"
    children = [f"/square/f1-1-{i}" for i in range(1, N + 1)]  # job 1 of /fanout/f1
    async with Runtime(registry, db, lease_seconds=1.0) as rt:
        # what the killed process left behind
        parent = await rt.get("/fanout/f1")
        assert parent.owner is not None  # the dead process still holds the parent's lease
        inbox = [e for e in await _events(rt, "/fanout/f1") if e["type"] == "inbox"]
        assert len(inbox) == 1 and inbox[0]["value"]["from"] == "/_cli/run"
        job_key = inbox[0]["key"]
        assert await rt.replies("/fanout/f1", job_key) == []
        committed_before = {
            url for url in children if any(e["type"] == "texts" for e in await _events(rt, url))
        }
        assert committed_before  # the crash came after at least one child finished
        ticks_before = _ticks(ticks_log)

        stop = anyio.Event()
        replies: list[Any] = []

        async def watch() -> None:
            while not replies:
                replies.extend(await rt.replies("/fanout/f1", job_key))
                await anyio.sleep(0.05)
            await anyio.sleep(0.5)  # room for a duplicate reply to show up, if there were one
            stop.set()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await rt.worker(poll_interval=0.1).run(stop)

        assert await rt.replies("/fanout/f1", job_key) == [55]

        state = await rt.state_of("/fanout/f1")
        assert {k: r["value"] for k, r in state["results"].items()} == {
            url: i * i for i, url in enumerate(children, start=1)
        }
        assert state["jobs"][job_key]["done"] is True
        parent_events = await _events(rt, "/fanout/f1")
        results_type = registry.get("fanout").state["results"].event_type("results")
        writes = Counter(e["key"] for e in parent_events if e["type"] == results_type)
        assert writes == dict.fromkeys(children, 1)  # each result recorded exactly once
        finished = Counter(
            (e["value"]["finished_child"]["url"], e["value"]["finished_child"]["response"])
            for e in parent_events
            if e["type"] == "wakes" and (e.get("value") or {}).get("kind") == "child_finished"
        )
        # every child run finishes once: the first wake (no reply) and the tick wake (x*x)
        expected: dict[tuple[str, int | None], int] = {(url, None): 1 for url in children}
        expected.update({(url, i * i): 1 for i, url in enumerate(children, start=1)})
        assert finished == expected
        runs = [e["value"] for e in parent_events if e["type"] == "runs"]
        assert [r["attempt"] for r in runs].count(2) == 1  # the killed wake, redelivered once
        assert all(r["status"] == "completed" for r in runs)
        texts = [e["value"] for e in parent_events if e["type"] == "texts"]
        assert [(t["in_reply_to"], t["value"]) for t in texts] == [(job_key, 55)]

        for i, url in enumerate(children, start=1):
            events = await _events(rt, url)
            ticks = [e for e in events if e["type"] == "inbox" and e["value"]["payload"]["tick"]]
            assert len(ticks) == 1, url  # the delayed send fired exactly once
            assert [e["value"]["value"] for e in events if e["type"] == "texts"] == [i * i]
            completed = [
                e for e in events if e["type"] == "runs" and e["value"]["status"] == "completed"
            ]
            assert len(completed) == 2, url  # the first wake and the tick wake, once each

        # a child tick wake that committed before the crash never ran again
        ticks_after = _ticks(ticks_log)[len(ticks_before) :]
        rerun = {url for url, _ in ticks_after} & committed_before
        assert not rerun, (rerun, ticks_before, ticks_after)
        # and every child whose tick had not committed ran it (again) exactly once
        assert Counter(url for url, _ in ticks_after) == dict.fromkeys(
            set(children) - committed_before, 1
        )
