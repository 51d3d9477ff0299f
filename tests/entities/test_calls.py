"""Request-response at one-way speed: ``POST …/call`` answers in the request that sends, and a
waiter is woken by the commit that answers its message, not by every append to the entity's
stream (counted in store reads, not timed), on every backend; a call retried with its
idempotency key after a SIGKILL of the server returns the one answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx2
import pytest

from entities import EntityNotFound, EntityStopped, Runtime, VirtualClock
from entities._awaiting import waiters_of
from entities._pipeline.inbox import message_event
from entities._replies import RecentReplies
from entities.server import create_app
from entities.server._embedded import EmbeddedWorker, can_embed
from streams import Append, Store, open_store
from tests._live import serving
from tests.entities.apps import calls
from tests.entities.apps.calls import registry

from ._support import EntitiesProcess, free_port

_T = TypeVar("_T")
_COUNTING: ContextVar[bool] = ContextVar("counting", default=False)


class ReadCounter:
    """Counts the store reads made by tasks run through :meth:`counted`."""

    def __init__(self, store: Store) -> None:
        self.n = 0
        self.events = 0  # stream events read
        for name in ("read", "read_before", "kv_get", "kv_scan", "head"):
            setattr(store, name, self._wrap(getattr(store, name)))

    def _wrap(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            if _COUNTING.get():
                self.n += 1
                messages = getattr(result, "messages", None)
                if isinstance(result, tuple):  # read_before: (messages, offset)
                    messages = result[0]
                self.events += len(messages) if isinstance(messages, list) else 0
            return result

        return wrapped

    @staticmethod
    async def counted(coro: Coroutine[Any, Any, _T]) -> _T:
        _COUNTING.set(True)  # in this task's own context only
        return await coro


async def until(check: Callable[[], bool], seconds: float = 30.0) -> None:
    with anyio.fail_after(seconds):
        while not check():  # noqa: ASYNC110 - polled by design
            await asyncio.sleep(0.005)


def _first_args_of(store: Store, method: str) -> list[str]:
    """The first argument of each call of ``store``'s ``method`` from now on, in order."""
    seen: list[str] = []
    original = getattr(store, method)

    async def counted(first: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(first)
        return await original(first, *args, **kwargs)

    setattr(store, method, counted)
    return seen


def _scans_of(store: Store) -> list[str]:
    """The namespaces of ``store``'s side-table scans from now on, in order."""
    return _first_args_of(store, "kv_scan")


def _stream_reads_of(store: Store) -> list[str]:
    """The paths of ``store``'s stream reads from now on, in order."""
    return _first_args_of(store, "read")


WAITERS = 1000


async def test_a_reply_is_found_without_reading_the_stream(store_url: str) -> None:
    """Behind a long history, an answered call reads the reply index, not the stream."""
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        reads = ReadCounter(rt.store)
        url = "/desk/long"
        await rt.spawn(url)
        for i in range(30):  # 1,500 messages answered: a stream of some 3,000 events
            for j in range(50):
                await rt.send(url, {"ask": i * 50 + j})
            await rt.run_until_idle()
        receipt = await rt.send(url, {"ask": -1})
        await rt.run_until_idle()
        found, timed_out = await reads.counted(
            rt.wait_outcome(url, receipt.key, after=receipt.offset, wait=5)
        )
        assert found.replies == [-1] and found.status == "completed" and not timed_out
        assert reads.n == 1 and reads.events == 0  # one index read
        # without its offset: the index and the unacknowledged tail (the last wake's output)
        reads.n = 0
        found = await reads.counted(rt.outcome(url, receipt.key))
        assert found.replies == [-1] and reads.events <= 5 and reads.n <= 5  # the last output


async def test_waiters_are_woken_only_by_their_answer(store_url: str) -> None:
    calls.GATE = gate = asyncio.Event()  # of this test's loop
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        reads = ReadCounter(rt.store)
        hub = waiters_of(rt.store)
        url = "/desk/hot"
        await rt.spawn(url)
        await rt.run_until_idle()
        await rt.send(url, {"hold": True})
        holding = asyncio.create_task(rt.run_until_idle(max_wakes=1))
        with anyio.fail_after(30):  # the hold's wake was claimed: its handler waits at the gate
            while (await rt.get(url)).status != "running":  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        receipts = [await rt.send(url, {"ask": i}) for i in range(WAITERS)]
        waiters = [
            asyncio.create_task(
                reads.counted(rt.wait_outcome(url, r.key, after=r.offset, wait=120))
            )
            for r in receipts
        ]
        await until(lambda: hub.sleeping == WAITERS)
        settled = reads.n
        assert settled <= 10 * WAITERS  # each looked once: the index and the short tail

        # appends to the hot entity's stream wake no one
        reads.n, looks = 0, hub.looks
        for i in range(20):
            await rt.send(url, {"ask": 10_000 + i})
        await asyncio.sleep(0.1)
        assert reads.n == 0 and hub.looks == looks
        assert hub.sleeping == WAITERS

        # a wake commit that answers none of them: one look at the record, no waiter woken
        gate.set()
        await holding
        await until(lambda: hub.looks > looks)
        await asyncio.sleep(0.1)
        assert reads.n == 0 and hub.looks - looks <= 2
        assert not any(w.done() for w in waiters)

        # a commit about one message (a cancel) wakes its waiter alone
        await rt.cancel_message(url, receipts[0].key)
        found, timed_out = await waiters[0]
        assert found.status == "cancelled" and not timed_out
        await asyncio.sleep(0.1)
        assert 0 < reads.n <= 10  # that waiter's look, not one per waiter
        assert not any(w.done() for w in waiters[1:])

        # the wake that answers them all: each reads its own answer once
        reads.n = 0
        await rt.run_until_idle()
        answers = await asyncio.gather(*waiters[1:])
        assert [found.replies for found, _ in answers] == [[i] for i in range(1, WAITERS)]
        assert all(not timed_out for _, timed_out in answers)
        assert reads.n <= 10 * WAITERS


async def test_a_kill_while_a_call_sends_ends_the_call_at_once(store_url: str) -> None:
    """A call waits before it sends and skips its first look while nothing that could answer
    its message without naming it came: a kill that lands while the message is being sent
    still ends the wait at once (``cancelled``), not at the next recheck (5 s)."""
    async with Runtime(registry, store_url, clock=VirtualClock()) as rt:
        url = "/desk/doomed"
        await rt.spawn(url)
        await rt.run_until_idle()
        send = rt._send

        async def send_then_kill(*args: Any, **kwargs: Any) -> Any:
            receipt = await send(*args, **kwargs)
            await rt.kill(url)  # before the caller's first look
            return receipt

        rt._send = send_then_kill  # type: ignore[method-assign]
        with anyio.fail_after(3):
            result = await rt.call(url, {"ask": 1}, wait=30)
        assert result.status == "cancelled" and result.replies == [] and not result.timed_out


async def test_a_wake_of_this_process_hands_its_replies_to_the_caller(store_url: str) -> None:
    """A caller in the worker's process is answered by the commit itself: with every reply
    signal of the store lost, calls still return at once (not at the next recheck), and read
    neither the reply index nor the entity record."""
    async with Runtime(registry, store_url) as rt:
        reads = ReadCounter(rt.store)
        notify = rt.store._notify

        def without_reply_signals(paths: set[str]) -> None:
            notify({p for p in paths if not p.startswith("reply:")})

        rt.store._notify = without_reply_signals  # type: ignore[method-assign]
        stop = anyio.Event()
        working = asyncio.create_task(rt.worker(poll_interval=30).run(stop))
        try:
            await rt.spawn("/desk/handed")
            with anyio.fail_after(4):  # a missed answer waits for the recheck (5 s)
                for i in range(5):
                    result = await reads.counted(rt.call("/desk/handed", {"ask": i}, wait=30))
                    assert result.replies == [i] and result.status == "completed"
            assert reads.n == 0
        finally:
            stop.set()
            await working


CALL = "/_entities/entities/desk/{id}/call"


async def test_a_call_answers_in_the_request_that_sends(store_url: str) -> None:
    async with (
        Runtime(registry, store_url) as rt,
        serving(create_app(rt)) as base,
        httpx2.AsyncClient(base_url=base, timeout=30) as http,
    ):
        stop = anyio.Event()
        working = asyncio.create_task(rt.worker(poll_interval=0.2).run(stop))
        try:
            await rt.spawn("/desk/a")
            answer = await http.post(CALL.format(id="a"), json={"payload": {"ask": 5}})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["replies"] == [5] and body["status"] == "completed"
            assert body["timed_out"] is False and body["error"] is None
            assert body["url"] == "/desk/a" and body["key"] and body["offset"]
            # the wait in the query, a run given up: its error in the same response
            failed = await http.post(
                CALL.format(id="a"), params={"wait_ms": 20_000}, json={"payload": {"fail": 1}}
            )
            assert failed.status_code == 200, failed.text
            assert failed.json()["status"] == "dead_lettered"
            assert "asked to fail" in failed.json()["error"]
            # the same idempotency key: one message, one answer
            headers = {"Idempotency-Key": "call-7"}
            first = await http.post(
                CALL.format(id="a"), json={"payload": {"ask": 7}}, headers=headers
            )
            again = await http.post(
                CALL.format(id="a"), json={"payload": {"ask": 7}}, headers=headers
            )
            assert first.json() == again.json() and again.json()["replies"] == [7]
            events, _ = await rt.read("/desk/a", limit=10_000)
            assert sum(1 for e in events if e["type"] == "inbox") == 3
            # validated as a send
            bad = [
                (await http.post(CALL.format(id="nobody"), json={"payload": {}}), 404),
                (await http.post(CALL.format(id="a"), params={"wait_ms": "x"}, json={}), 400),
                (await http.post(CALL.format(id="a"), json={"wait_ms": -1}), 422),
                (await http.post(CALL.format(id="a"), json={"payload": 1, "extra": 1}), 422),
                (await http.post(CALL.format(id="a"), json={"from": "/desk/b"}), 422),
            ]
            assert [r.status_code for r, _ in bad] == [code for _, code in bad]
        finally:
            stop.set()
            await working


async def test_a_call_that_times_out_says_so_and_the_message_lands(store_url: str) -> None:
    async with (
        Runtime(registry, store_url, clock=VirtualClock()) as rt,
        serving(create_app(rt)) as base,
        httpx2.AsyncClient(base_url=base, timeout=30) as http,
    ):
        await rt.spawn("/desk/t")
        await rt.run_until_idle()
        answer = await http.post(CALL.format(id="t"), json={"payload": {"ask": 3}, "wait_ms": 300})
        assert answer.status_code == 202, answer.text  # no worker runs: no answer in time
        body = answer.json()
        assert body["timed_out"] is True and body["status"] == "pending" and body["replies"] == []
        events, _ = await rt.read("/desk/t", limit=1000)
        assert [e["key"] for e in events if e["type"] == "inbox"] == [body["key"]]
        await rt.run_until_idle()
        later = await http.get(
            f"/_entities/entities/desk/t/replies/{body['key']}", params={"after": body["offset"]}
        )
        assert later.json()["replies"] == [3]


async def test_a_call_retried_after_a_sigkill_returns_the_one_answer(
    shared_store_url: str, tmp_path: Path
) -> None:
    """The server dies while the call waits (its message landed, its wake runs); the client
    calls again with the same key once it is back: one message, and its answer."""
    port = free_port()
    server = EntitiesProcess(
        ["serve", "tests/entities/apps/calls.py:registry", "--db", shared_store_url,
         "--port", str(port), "--lease-seconds", "1"],
        log=tmp_path / "serve.log",
        port=port,
    )  # fmt: skip
    body = {"payload": {"ask": 42, "sleep_ms": 1500}, "wait_ms": 30_000}
    headers = {"Idempotency-Key": "call-after-kill"}
    try:
        await asyncio.to_thread(server.start)
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert (await http.put("/_entities/entities/desk/k", json={})).status_code == 201
            call = asyncio.create_task(http.post(CALL.format(id="k"), json=body, headers=headers))
            with anyio.fail_after(30):  # the wake of the message runs (the handler sleeps)
                while (await http.get("/_entities/entities/desk/k")).json()["status"] != "running":  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            server.kill()
            with pytest.raises(httpx2.TransportError):
                await call
            await asyncio.to_thread(server.start)
            answer = await http.post(CALL.format(id="k"), json=body, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json()["replies"] == [42] and answer.json()["status"] == "completed"
            again = await http.post(CALL.format(id="k"), json=body, headers=headers)
            assert again.json() == answer.json()
    finally:
        server.kill()
    async with Runtime(registry, shared_store_url) as rt:
        events, _ = await rt.read("/desk/k", limit=1000)
    assert [e["key"] for e in events if e["type"] == "inbox"] == [answer.json()["key"]]


async def test_a_call_costs_few_reads_beside_its_wake(store_url: str) -> None:
    """Sequential calls through a running worker: the send reads no entity record (its
    commit finds a missing or stopped entity), the caller is woken by its own message's
    signal and takes the replies the worker in this process handed over (no look at the
    record, no index read), and the worker scans the pending marks once per call (a wake
    that removes its entity's mark does not send the worker round again)."""
    async with Runtime(registry, store_url) as rt:
        calls_made: list[tuple[str, str]] = []
        for name in ("kv_get", "kv_scan"):
            original = getattr(rt.store, name)

            async def wrapped(
                *args: Any, _name: str = name, _original: Any = original, **kwargs: Any
            ) -> Any:
                calls_made.append((_name, str(args[0])))
                return await _original(*args, **kwargs)

            setattr(rt.store, name, wrapped)
        hub = waiters_of(rt.store)
        stop = anyio.Event()
        working = asyncio.create_task(rt.worker(poll_interval=30).run(stop))
        try:
            await rt.spawn("/desk/seq")
            await rt.call("/desk/seq", {"ask": 0}, wait=30)  # warm: the first wake
            calls_made.clear()
            looks = hub.looks
            for i in range(20):
                result = await rt.call("/desk/seq", {"ask": i}, wait=30)
                assert result.replies == [i] and not result.timed_out
            assert hub.looks == looks
            assert ("kv_get", "entity") not in calls_made
            # the worker's commit hands the replies to its callers here: no index read
            assert calls_made.count(("kv_scan", "reply")) <= 2
            assert calls_made.count(("kv_scan", "pending")) <= 20 + 2
            # a send still finds a missing or stopped entity
            with pytest.raises(EntityNotFound):
                await rt.send("/desk/nobody", {"ask": 1})
            await rt.kill("/desk/seq")
            with pytest.raises(EntityStopped):
                await rt.send("/desk/seq", {"ask": 1})
        finally:
            stop.set()
            await working


async def test_recent_replies_keep_only_what_callers_here_wait_for() -> None:
    """The hand-over from a wake's commit to the callers in the same process holds the
    replies of awaited messages only, those of the first commit that replied, hands them to
    every caller of the message (one scheduled call per commit and event loop), and keeps
    them until the last caller of the message stops waiting."""
    recent = RecentReplies()
    handed: list[tuple[str, list[Any]]] = []
    recent.publish("/d/a", [("k1", 1)])  # nobody waits: nothing kept
    assert recent.take("/d/a", "k1") is None
    forget_one = recent.expect("/d/a", "k1", lambda r: handed.append(("one", r)))
    forget_two = recent.expect("/d/a", "k1", lambda r: handed.append(("two", r)))
    recent.publish("/d/a", [("k1", 1), ("k2", 2), ("k1", 3)])
    assert handed == []  # handed over on the callers' loop, not inside the publish
    await asyncio.sleep(0)
    assert handed == [("one", [1, 3]), ("two", [1, 3])]
    recent.publish("/d/a", [("k1", 4)])  # a later commit's reply: the index's first stands
    await asyncio.sleep(0)
    assert handed[2:] == [("one", [1, 3]), ("two", [1, 3])]
    assert recent.take("/d/a", "k1") == [1, 3]
    assert recent.take("/d/a", "k2") is None and recent.take("/d/b", "k1") is None
    forget_one()
    assert recent.take("/d/a", "k1") == [1, 3]  # one caller still waits
    forget_two()
    forget_two()  # twice: no harm
    assert recent.take("/d/a", "k1") is None
    recent.publish("/d/a", [("k1", 5)])
    await asyncio.sleep(0)
    assert recent.take("/d/a", "k1") is None and len(handed) == 4


async def test_replies_are_handed_to_a_caller_on_another_thread_s_loop() -> None:
    """A commit on the worker's thread hands the replies over to the caller's event loop
    (``entities serve``'s shape): the caller is answered without a notification or a read."""
    recent = RecentReplies()
    got: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
    forget = recent.expect("/d/a", "k1", got.set_result)

    def commit_on_another_thread() -> None:
        async def worker() -> None:
            recent.publish("/d/a", [("k1", "hi")], recent.stage("/d/a", ["k1"]))

        asyncio.run(worker())

    await asyncio.get_running_loop().run_in_executor(None, commit_on_another_thread)
    assert await asyncio.wait_for(got, 5) == ["hi"]
    forget()


async def test_commits_on_another_thread_wake_the_callers_loop_once_per_batch() -> None:
    """A worker's group commit answers many callers at once: the commits handing replies over
    to another thread's loop before that loop got to them wake it once, not once each (each
    ``call_soon_threadsafe`` wakes the loop and contends for the GIL: calls through ``entities
    serve`` ran 13% faster without them), and the hand-overs keep their order."""
    recent = RecentReplies()
    loop = asyncio.get_running_loop()
    handed: list[str] = []
    forgets = [recent.expect("/d/a", f"k{i}", lambda r: handed.append(r[0])) for i in range(20)]
    wakeups = 0
    threadsafe = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:
        nonlocal wakeups
        wakeups += 1
        return threadsafe(callback, *args, context=context)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
    try:

        def commits() -> None:
            for i in range(20):  # one publish per wake commit, as the worker's lanes do
                recent.publish("/d/a", [(f"k{i}", f"r{i}")])

        thread = threading.Thread(target=commits)
        thread.start()
        thread.join()  # this loop is held meanwhile: every hand-over waits for it
        assert handed == [] and wakeups == 1
        for _ in range(10):
            await asyncio.sleep(0)
        assert handed == [f"r{i}" for i in range(20)]
        # once drained, the next commit wakes the loop again
        again = threading.Thread(target=lambda: recent.publish("/d/a", [("k0", "again")]))
        again.start()
        again.join()
        assert wakeups == 2
    finally:
        loop.call_soon_threadsafe = threadsafe  # type: ignore[method-assign]
        for forget in forgets:
            forget()


async def test_a_caller_here_waits_for_the_commit_answering_it_not_the_index(
    store_url: str,
) -> None:
    """``entities serve``'s shape: the worker on a thread and a store of its own. The signal
    of the commit that answers a call can reach the caller (by the store's notifications)
    before the worker's thread hands the replies over; the caller then waits for that
    hand-over, so no call reads the reply index. (PostgreSQL: its notifications name what
    changed. A SQLite store learns of another store's commits by watching its file, which
    wakes every waiter for a first look, index included.)"""
    if not store_url.startswith("postgresql"):
        pytest.skip("SQLite's file watch wakes every waiter; memory cannot be shared")
    async with Runtime(registry, store_url) as rt:
        assert can_embed(rt)
        scans = _scans_of(rt.store)
        embedded = EmbeddedWorker(rt)
        await embedded.start()
        try:
            await rt.spawn("/desk/here")
            await rt.call("/desk/here", {"ask": 0}, wait=30)  # warm: the first wake
            scans.clear()
            for i in range(30):
                result = await rt.call("/desk/here", {"ask": i}, wait=30)
                assert result.replies == [i] and not result.timed_out
        finally:
            embedded.stop()
            await embedded.wait()
        assert scans.count("reply") == 0


async def test_entities_serve_s_worker_claims_a_message_sent_here_without_a_scan(
    store_url: str,
) -> None:
    """``entities serve``'s shape: the server's store hands the worker on its thread the
    pending marks its commits wrote, and the worker claims at once, instead of scanning every
    pending mark first on the commit's signal (one scan per call before: a round trip on
    PostgreSQL between the send's commit and the claim)."""
    if not store_url.startswith(("postgresql", "sqlite")):
        pytest.skip("a memory store cannot be shared: its worker stays on the server's loop")
    async with Runtime(registry, store_url) as rt:
        assert can_embed(rt)
        embedded = EmbeddedWorker(rt)
        worker = await embedded.start()
        scans = _scans_of(worker.rt.store)
        try:
            await rt.spawn("/desk/offered")
            await rt.call("/desk/offered", {"ask": 0}, wait=30)  # warm: the first wake
            scans.clear()
            began = time.monotonic()
            for i in range(20):
                result = await rt.call("/desk/offered", {"ask": i}, wait=30)
                assert result.replies == [i] and not result.timed_out
            # the worker's loop goes round by itself (its poll; a timer, an entity to retry):
            # a few rounds, never one per call (20 scans before)
            rounds = 4 + int((time.monotonic() - began) / worker.poll_interval)
            assert scans.count("pending") <= rounds, scans
            # a burst: each mark offered, its wake claimed while lanes are free
            urls = [f"/desk/burst{i}" for i in range(6)]
            for url in urls:
                await rt.spawn(url)
            answers = await asyncio.gather(*(rt.call(u, {"ask": 7}, wait=30) for u in urls))
            assert [a.replies for a in answers] == [[7]] * len(urls)
        finally:
            embedded.stop()
            await embedded.wait()


async def test_entities_serve_s_worker_folds_what_was_sent_here_without_reading_it(
    store_url: str,
) -> None:
    """``entities serve``'s shape: the worker knows the messages the server's commits and its
    own appended to an entity's stream, so a claim folds them instead of reading the stream (a
    round trip on PostgreSQL between the claim's offer and its commit). A message appended by
    another process in between (no mark, nothing handed over: a gap in the positions) is read,
    and answered."""
    if not store_url.startswith(("postgresql", "sqlite")):
        pytest.skip("a memory store cannot be shared: its worker stays on the server's loop")
    url = "/desk/folded"
    async with Runtime(registry, store_url) as rt:
        embedded = EmbeddedWorker(rt)
        worker = await embedded.start()
        reads = _stream_reads_of(worker.rt.store)
        try:
            await rt.spawn(url)
            for i in range(2):  # warm: the first wakes (a view cached, its stream pinned)
                await rt.call(url, {"ask": i}, wait=30)
            reads.clear()
            for i in range(20):
                result = await rt.call(url, {"ask": i}, wait=30)
                assert result.replies == [i] and not result.timed_out
            assert reads.count("desk/folded/main") <= 2, reads
            assert worker.claimer.tails.counts["known"] >= 18
            # another process appends a message to the stream without marking it pending
            async with open_store(store_url) as other:
                event = message_event("foreign", {"ask": 99}, None, None, rt.clock.now())
                await other.commit([Append("desk/folded/main", [event])])
            result = await rt.call(url, {"ask": 7}, wait=30)
            assert result.replies == [7]
            assert reads.count("desk/folded/main") >= 1  # the gap was read
            found, timed_out = await rt.wait_outcome(url, "foreign", wait=30)
            assert found.replies == [99] and not timed_out
        finally:
            embedded.stop()
            await embedded.wait()


async def test_a_staged_answer_is_waited_for_and_a_failed_commit_lets_go() -> None:
    """A caller that finds its message staged by a commit in flight here waits for it: the
    replies once published (from another thread), nothing once the commit gave up; an
    unstaged message is answered at once."""
    recent = RecentReplies()
    recent.expect("/d/a", "k1", lambda _replies: None)
    recent.expect("/d/a", "k2", lambda _replies: None)
    assert recent.stage("/d/a", ["k1", "k3"]) == [("/d/a", "k1")]  # k3: nobody waits here
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(recent.settled("/d/a", "k1", 30))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    staged = [("/d/a", "k1")]
    await loop.run_in_executor(None, lambda: recent.publish("/d/a", [("k1", 7)], staged))
    assert await asyncio.wait_for(waiting, 5) == [7]
    # a commit that failed: its waiters read the index instead
    staged = recent.stage("/d/a", ["k2"])
    waiting = asyncio.create_task(recent.settled("/d/a", "k2", 30))
    await asyncio.sleep(0.01)
    recent.settle(staged)
    assert await asyncio.wait_for(waiting, 5) is None
    # nothing staged: no wait at all (a bounded wait would time out the test)
    assert await asyncio.wait_for(recent.settled("/d/a", "k9", 30), 1) is None
