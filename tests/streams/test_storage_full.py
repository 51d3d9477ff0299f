"""A full disk, on a real 2 MiB tmpfs: ``507`` with the JSON error shape, nothing half-written,
recovery as soon as space returns, and a start on a full disk that fails in one line.

Mounting needs root (CI runs as root); elsewhere these tests skip, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import anyio
import httpx2
import pytest

import streams
from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.server import create_app
from examples import all as examples_all
from streams import Op, OpResult, StorageFull, format_offset
from streams._backends.memory import MemoryStore
from streams.server._subscriptions import Subscriptions, normalize_config
from tests._live import serving
from tests.streams._live_server import TEST_SETTINGS, running_server
from tests.streams.test_server_cli import free_port
from tests.streams.test_server_subscriptions import Receiver

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = replace(TEST_SETTINGS, max_body_bytes=1024 * 1024)
BODY = os.urandom(32 * 1024)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test (skipped where mounting is not permitted)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; the filler file."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (64 * 1024, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    return filler


def test_a_full_disk_answers_507_writes_nothing_and_recovers(tmpfs: Path) -> None:
    with running_server(f"sqlite:///{tmpfs / 'streams.db'}", SETTINGS) as live:
        url = live.stream("s")
        octets = {"Content-Type": "application/octet-stream"}
        with httpx2.Client(timeout=30) as http:
            assert http.put(url, headers=octets).status_code == 201
            filler = fill(tmpfs)
            written = 0
            answer = None
            for _ in range(200):
                answer = http.post(url, content=BODY, headers=octets)
                if answer.status_code != 204 and answer.status_code != 200:
                    break
                written += 1
            assert answer is not None and answer.status_code == 507, answer
            assert answer.headers["content-type"] == "application/json"
            error = answer.json()
            assert set(error) == {"error"}
            assert error["error"]["code"] == "INSUFFICIENT_STORAGE"
            assert error["error"]["message"]
            head = http.head(url)
            assert head.headers["Stream-Next-Offset"] == format_offset(written)  # none half-done
            filler.unlink()  # space returns: the very next append works
            again = http.post(url, content=b"after", headers=octets)
            assert again.status_code in (200, 204), again.text
            assert again.headers["Stream-Next-Offset"] == format_offset(written + 1)


async def test_store_reads_back_exactly_what_was_acknowledged(tmpfs: Path) -> None:
    url = f"sqlite:///{tmpfs / 'streams.db'}"
    async with streams.open_store(url) as store:
        await store.create("s")
        filler = fill(tmpfs)
        acknowledged = 0
        with pytest.raises(StorageFull):
            for _ in range(200):
                await store.append("s", [BODY])
                acknowledged += 1
        filler.unlink()
        await store.append("s", [b"after"])
    async with streams.open_store(url) as store:
        messages = (await store.read("s", limit=1000)).messages
        assert [m.data for m in messages] == [BODY] * acknowledged + [b"after"]


async def test_the_entities_control_plane_answers_507(tmpfs: Path) -> None:
    db = f"sqlite:///{tmpfs / 'entities.db'}"
    async with Runtime(examples_all.registry, db) as runtime:
        async with serving(create_app(runtime)) as base, httpx2.AsyncClient(base_url=base) as http:
            assert (await http.put("/_entities/entities/counter/c0", json={})).status_code == 201
            filler = fill(tmpfs)
            answer = None
            for n in range(1, 200):
                answer = await http.put(
                    f"/_entities/entities/counter/c{n}", json={"tags": {"pad": "x" * 4000}}
                )
                if answer.status_code != 201:
                    break
            assert answer is not None, "no request was made"
            assert answer.status_code == 507, answer.text
            assert answer.json()["error"]["code"] == "INSUFFICIENT_STORAGE"
            for _ in range(50):
                sent = await http.post(
                    "/_entities/entities/counter/c0/send", json={"payload": {"add": 1}}
                )
                if sent.status_code != 202:
                    break
            assert sent.status_code == 507, sent.text
            assert sent.json()["error"]["code"] == "INSUFFICIENT_STORAGE"
            filler.unlink()
            later = await http.put("/_entities/entities/counter/later", json={})
            assert later.status_code == 201, later.text


@pytest.mark.parametrize("existing", [False, True])
def test_starting_on_a_full_disk_is_one_line(tmpfs: Path, existing: bool) -> None:
    db = f"sqlite:///{tmpfs / 'streams.db'}"
    if existing:
        with running_server(db, SETTINGS) as live, httpx2.Client(timeout=10) as http:
            assert http.put(live.stream("s")).status_code == 201
    fill(tmpfs)
    completed = subprocess.run(
        [sys.executable, "-m", "streams", "serve", "--db", db, "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "could not open the store" in line]
    assert len(lines) == 1 and "no space left" in lines[0], output


class FullOnDemand(MemoryStore):
    """A memory store whose commits fail with StorageFull while ``full`` is set."""

    full = False

    async def commit(self, ops: Sequence[Op]) -> list[OpResult]:
        if self.full:
            raise StorageFull("no space left (simulated)")
        return await super().commit(ops)


async def test_a_wake_whose_save_failed_starts_again_once_space_returns() -> None:
    """A wake that could not be saved must not stay in memory with no delivery or lease to end
    it: once space returns, the next write starts it and the webhook is called."""
    receiver = Receiver({"done": True})
    store = FullOnDemand()
    subs = Subscriptions(store, allow_private_webhooks=True)
    try:
        async with store:
            config = normalize_config(
                {"type": "webhook", "pattern": "jobs/*", "webhook": {"url": receiver.url}}, str
            )
            assert (await subs.put("s1", config, "http://127.0.0.1:1/v1/stream"))[0] == 201
            await store.create("jobs/1")
            await subs._observe("jobs/1", 0, True)  # linked; nothing pending yet
            await store.append("jobs/1", [b"x"])
            store.full = True
            with pytest.raises(StorageFull):
                await subs._observe("jobs/1", 0, False)
            assert subs._subs["s1"].wake is None  # taken back from the store
            store.full = False
            await store.append("jobs/1", [b"y"])
            await subs._observe("jobs/1", 1, False)
            await asyncio.to_thread(receiver.wait)
    finally:
        await subs.aclose()
        receiver.close()


async def test_a_wake_whose_commit_meets_a_full_disk_commits_once_space_returns(
    tmpfs: Path,
) -> None:
    registry = Registry()
    started, gate = anyio.Event(), anyio.Event()

    @registry.define("disk")
    async def disk(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            started.set()
            await gate.wait()
            ctx.reply("done")

    async with Runtime(registry, f"sqlite:///{tmpfs / 'e.db'}", lease_seconds=30) as rt:
        await rt.spawn("/disk/d")
        await rt.run_until_idle()
        receipt = await rt.send("/disk/d", "go")
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.run_until_idle)
            await started.wait()
            filler = fill(tmpfs)
            gate.set()
            await anyio.sleep(0.6)  # the wake's commit meets the full disk, and waits
            assert (await rt.outcome("/disk/d", receipt.key)).status == "pending"
            filler.unlink()
            freed = time.monotonic()
        waited = time.monotonic() - freed
        outcome = await rt.outcome("/disk/d", receipt.key)
        assert (outcome.status, outcome.replies) == ("completed", ["done"])
        assert waited < 5, waited  # not the 30 s lease
        assert await rt.dead_letters() == []
        assert (await rt.get("/disk/d")).runs == 2  # the spawn's wake and this one: no retry
