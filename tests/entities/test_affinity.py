"""Entity affinity between workers sharing a store: each live worker announces itself, every
pending entity prefers one live worker (rendezvous hashing), workers take their own share first
and step in for another's entity only after it has waited ``STEAL_AFTER`` seconds.

One process here (other workers are presence records it reads), on every store backend."""

from __future__ import annotations

import time

import anyio
import orjson

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities._pipeline.affinity import PRESENCE_TTL, STEAL_AFTER, Affinity
from entities._records import ENTITY_NS, PENDING_NS, WORKER_NS
from streams import KvCheck, KvPut, open_store

registry = Registry()
ran: dict[str, list[float]] = {}  # url -> when its handler started (monotonic)
expected = 0
all_ran: anyio.Event  # set by _expect


@registry.define("probe", description="records when it ran")
async def probe(ctx: HandlerContext, wake: WakeEvent) -> None:
    ran.setdefault(ctx.entity_url, []).append(time.monotonic())
    if len(ran) >= expected:
        all_ran.set()


def _expect(count: int) -> None:
    global expected, all_ran
    ran.clear()
    expected, all_ran = count, anyio.Event()


async def workers_of(rt: Runtime, url: str) -> list[str]:
    """The worker of each completed run of ``url`` (from its run records)."""
    events, _next = await rt.read(url)
    return [e["value"]["worker"] for e in events if e["type"] == "runs"]


def _presence(worker: str, expires: float) -> KvPut:
    return KvPut(WORKER_NS, worker, orjson.dumps({"expires": expires, "pid": 0, "host": "x"}))


def test_the_split_is_even_for_worker_ids_that_differ_in_one_character() -> None:
    """Ids like ``bench-0``/``bench-1`` are how fleets are named. With a linear hash (CRC-32,
    the first version) the winner hung on one bit of one weight: 452/548 over 1,000 counters,
    and the bigger share bounded a round of two workers at 1000/548 of one worker's speed."""
    urls = [f"/counter/c{i}" for i in range(1000)]
    for ids in (("bench-0", "bench-1"), ("w1", "w2"), ("bench-0", "bench-1", "bench-2", "bench-3")):
        shares = []
        for worker in ids:
            affinity = Affinity(None, worker)  # type: ignore[arg-type]  # prefers() reads nothing
            affinity.live = ids
            shares.append(sum(affinity.prefers(u) for u in urls))
        assert sum(shares) == len(urls), (ids, shares)
        p = 1 / len(ids)
        spread = 2.5 * (len(urls) * p * (1 - p)) ** 0.5  # 2.5 binomial sd: 40 of 500, 34 of 250
        assert all(abs(share - len(urls) * p) <= spread for share in shares), (ids, shares)


async def test_live_workers_split_the_pending_entities_between_them(store_url: str) -> None:
    async with open_store(store_url) as store:
        now = time.time()
        await store.commit([_presence("a", now + 60), _presence("b", now + 60)])
        a, b = Affinity(store, "a"), Affinity(store, "b")
        await a.refresh(now)
        await b.refresh(now)
        assert a.live == b.live == ("a", "b")
        pending = [(f"/probe/p{i}", b"t") for i in range(400)]
        mine_a = {u for u, _ in pending if a.prefers(u)}
        mine_b = {u for u, _ in pending if b.prefers(u)}
        assert mine_a.isdisjoint(mine_b)
        assert mine_a | mine_b == {u for u, _ in pending}
        assert 120 < len(mine_a) < 280  # a hash split, not everything on one side
        # own share first; the other's entities are held back until they have waited
        assert {u for u, _ in a.order(pending)} == mine_a
        waited = a.next_steal()
        assert waited is not None and 0 < waited <= STEAL_AFTER


async def test_an_expired_or_unreadable_presence_is_not_a_live_worker(store_url: str) -> None:
    async with open_store(store_url) as store:
        now = time.time()
        await store.commit(
            [
                _presence("gone", now - 1),
                KvPut(WORKER_NS, "garbled", b"not json"),
                _presence("here", now + PRESENCE_TTL),
            ]
        )
        me = Affinity(store, "me")
        await me.refresh(now)
        assert me.live == ("here", "me")


async def test_another_live_workers_entities_are_taken_after_they_waited(store_url: str) -> None:
    """A worker that announced itself and then stopped taking work (stuck, or paused) does not
    strand the entities that prefer it: the running worker takes them after STEAL_AFTER."""
    async with Runtime(registry, store_url, worker_id="me") as rt:
        await rt.store.commit([_presence("ghost", rt.clock.now() + 60)])
        urls = [f"/probe/e{i}" for i in range(40)]
        probe_of = Affinity(rt.store, "me")
        await probe_of.refresh(rt.clock.now())
        assert probe_of.live == ("ghost", "me")
        own = [u for u in urls if probe_of.prefers(u)]
        theirs = [u for u in urls if not probe_of.prefers(u)]
        assert own and theirs
        _expect(len(urls))
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.worker(poll_interval=5.0).run, stop)
            sent = time.monotonic()
            for url in urls:
                await rt.spawn(url)
            with anyio.fail_after(20):
                await all_ran.wait()
            stop.set()
        # everything ran, once, on the only running worker
        assert sorted(ran) == sorted(urls)
        assert all(len(starts) == 1 for starts in ran.values())
        for url in urls:
            assert await workers_of(rt, url) == ["me"]
        # the ghost's share waited its turn; this worker's own share did not
        assert min(ran[u][0] for u in theirs) - sent >= STEAL_AFTER * 0.9
        assert min(ran[u][0] for u in own) - sent < STEAL_AFTER


async def test_a_worker_announces_itself_while_it_runs_and_withdraws_on_stop(
    store_url: str,
) -> None:
    async with Runtime(registry, store_url, worker_id="w1") as rt:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            worker = rt.worker()
            tg.start_soon(worker.run, stop)
            with anyio.fail_after(10):
                while await rt.store.kv_get(WORKER_NS, "w1") is None:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            record = orjson.loads(await rt.store.kv_get(WORKER_NS, "w1") or b"{}")
            assert record["expires"] > rt.clock.now()
            stop.set()
        assert await rt.store.kv_get(WORKER_NS, "w1") is None


async def test_an_entity_found_leased_elsewhere_is_tried_again_when_its_mark_changes(
    store_url: str,
) -> None:
    """A worker that finds an entity leased by another worker does not wait for the lease to
    run out when the holder finishes and the entity is marked again."""
    async with Runtime(registry, store_url, worker_id="me") as rt:
        url = "/probe/held"
        _expect(1)
        await rt.spawn(url)
        await rt.run_until_idle()
        found = await rt.record(url)
        assert found is not None
        idle, idle_raw = found
        held = idle.model_copy(
            update={"owner": "other", "status": "running", "lease_expires": rt.clock.now() + 60}
        )
        held_raw = held.dump()
        await rt.store.commit([KvCheck(ENTITY_NS, url, idle_raw), KvPut(ENTITY_NS, url, held_raw)])
        await rt.send(url, {"n": 1})
        _expect(1)
        worker = rt.worker(poll_interval=30.0)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            with anyio.fail_after(10):
                while not worker.claims["held"]:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            # the other worker finishes (releases its lease); then one more message arrives
            released = held.model_copy(
                update={"owner": None, "status": "idle", "lease_expires": 0.0}
            )
            await rt.store.commit(
                [KvCheck(ENTITY_NS, url, held_raw), KvPut(ENTITY_NS, url, released.dump())]
            )
            await rt.send(url, {"n": 2})
            with anyio.fail_after(5):  # not the 60 s the lease had left
                await all_ran.wait()
            stop.set()
        assert worker.claims["held"] == 1


async def test_a_worker_forgets_blocks_on_entities_no_longer_pending(store_url: str) -> None:
    """Entities a worker once found leased or backing off do not accumulate in its memory."""
    async with Runtime(registry, store_url, worker_id="me") as rt:
        worker = rt.worker()
        await rt.spawn("/probe/still")  # pending: its first wake
        far = rt.clock.now() + 60
        for i in range(3000):
            worker.claimer.block(f"/probe/gone{i}", far)
        worker.claimer.block("/probe/still", far)
        async with anyio.create_task_group() as tg:
            await worker._dispatch(tg)
            tg.cancel_scope.cancel()
        assert worker.claimer.blocked == {"/probe/still": (far, None)}


async def test_a_stolen_claim_goes_ahead_only_under_the_mark_it_was_seen_with(
    store_url: str,
) -> None:
    """A worker stepping in for another checks the entity's pending mark and record afresh: when
    the owner took the entity since the scan (mark gone or renewed), or holds its lease, the
    claim stops there, without a load or a commit; under the mark it saw, it claims."""
    async with Runtime(registry, store_url, worker_id="me") as rt:
        url = "/probe/stolen"
        _expect(1)
        await rt.spawn(url)
        await rt.run_until_idle()
        await rt.send(url, {"n": 1})
        seen = await rt.store.kv_get(PENDING_NS, url)
        assert seen is not None
        worker = rt.worker()
        found = await rt.record(url)
        assert found is not None
        before = found[1]

        # the owner ran it and it was marked again (another message): not under the seen mark
        await rt.store.commit([KvPut(PENDING_NS, url, b"renewed")])
        assert await worker.claim(url, seen, stolen=True) is None
        # the mark is gone (the owner finished): nothing to take
        await rt.store.commit([KvPut(PENDING_NS, url, None)])
        assert await worker.claim(url, seen, stolen=True) is None
        found = await rt.record(url)
        assert found is not None and found[1] == before  # no claim was committed
        assert sum(worker.claims.values()) == 0  # nor tried (no lost, held or empty claim)

        # under the mark it saw, with a stale cached record: claimed from a fresh read
        await rt.store.commit([KvPut(PENDING_NS, url, seen)])
        worker.claimer.remember(url, b"{}")  # a stale cache entry: a stolen claim does not use it
        claim = await worker.claim(url, seen, stolen=True)
        assert claim is not None and claim.record.epoch == found[0].epoch + 1
        assert worker.claims == {"won": 1}


async def test_an_entity_prefers_only_workers_that_serve_its_type(store_url: str) -> None:
    """A rolling deploy: ``old`` serves a and b, ``new`` a and c, ``legacy`` (a record of an
    earlier version, without types) everything. Each entity prefers among the workers that
    serve its type, so none waits ``STEAL_AFTER`` for a worker that will never take it."""
    async with open_store(store_url) as store:
        now = time.time()
        old = Affinity(store, "old", ["b", "a"], "v1")
        new = Affinity(store, "new", ["a", "c"], "v2")
        await store.commit([old.presence(now), new.presence(now)])
        await old.refresh(now)
        await new.refresh(now)
        urls = {t: [f"/{t}/e{i}" for i in range(200)] for t in "abc"}
        assert all(old.prefers(u) and not new.prefers(u) for u in urls["b"])
        assert all(new.prefers(u) and not old.prefers(u) for u in urls["c"])
        mine_old = {u for u in urls["a"] if old.prefers(u)}
        mine_new = {u for u in urls["a"] if new.prefers(u)}
        assert mine_old.isdisjoint(mine_new) and mine_old | mine_new == set(urls["a"])
        assert 50 < len(mine_old) < 150
        # old's own pending entities (it only ever looks at a and b): none held back
        pending = [(u, b"t") for u in urls["b"]]
        assert len(old.order(pending)) == len(pending) and old.next_steal() is None
        # what ``entities workers`` shows
        shown = {w.id: w for w in await Runtime(Registry(), store).workers()}
        assert (shown["old"].types, shown["old"].deploy_version) == (("a", "b"), "v1")
        assert (shown["new"].types, shown["new"].deploy_version) == (("a", "c"), "v2")
        assert shown["new"].serves("c") and not shown["new"].serves("b")
        # a worker of an earlier version (no types announced) counts as serving every type
        await store.commit([_presence("legacy", now + 60)])
        old.changed()
        await old.refresh(now)
        assert old.live == ("legacy", "new", "old")
        assert not all(old.prefers(u) for u in urls["b"])  # legacy takes its share of b
