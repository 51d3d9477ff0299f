"""``Notify``: a commit wakes the listeners of a name it stores nothing under, in this process
and (PostgreSQL ``NOTIFY``, a SQLite file watched) in others; listeners that asked for named
commits only are not called by a "wake everything", which they hear as ``*``."""

from __future__ import annotations

import anyio
import pytest

import streams
from streams import KvPut, Notify


async def test_a_notify_wakes_its_name_alone(store: streams.Store) -> None:
    heard: list[str] = []
    removers = [
        store.listen("reply:/a", lambda: heard.append("a"), broadcast=False),
        store.listen("reply:/b", lambda: heard.append("b"), broadcast=False),
        store.listen("*", lambda: heard.append("*"), broadcast=False),
    ]
    results = await store.commit([Notify("reply:/a"), KvPut("ns", "k", b"v")])
    assert results == [None, True]
    assert heard == ["a"]
    assert await store.kv_scan("ns") == [("k", b"v")]  # nothing stored under the name
    with anyio.fail_after(5):  # wait_signal hears a name too
        async with anyio.create_task_group() as tg:
            woken: list[bool] = []

            async def waiter() -> None:
                woken.append(await store.wait_signal("reply:/b", 5))

            tg.start_soon(waiter)
            await anyio.sleep(0.05)
            await store.commit([Notify("reply:/b")])
    assert woken == [True] and heard == ["a", "b"]
    heard.clear()
    store._notify_all()  # what a backend does when it cannot tell what changed
    assert heard == ["*"]
    for remove in removers:
        remove()
    await store.commit([Notify("reply:/a")])
    assert heard == ["*"]


async def test_a_notify_reaches_another_process_store(store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("a memory store is not shared")
    async with streams.open_store(store_url) as one, streams.open_store(store_url) as other:
        heard = anyio.Event()
        everything = anyio.Event()
        other.listen("reply:/x", heard.set, broadcast=False)
        other.listen("*", everything.set, broadcast=False)
        await other.commit([KvPut("ns", "warm", b"1")])  # SQLite: it writes the file too
        with anyio.fail_after(10):
            n = 0
            while not (heard.is_set() or everything.is_set()):
                # with a write: over SQLite a commit of names alone leaves the file as it was
                n += 1
                await one.commit([Notify("reply:/x"), KvPut("ns", "k", str(n).encode())])
                with anyio.move_on_after(0.2):
                    await heard.wait()
        if store_url.startswith("postgresql"):
            assert heard.is_set()  # NOTIFY carries the name itself
        # SQLite: another connection's commit is heard as "wake everything" (the file moved)
