"""Scale-out on PostgreSQL under chaos: ``serve --no-worker`` plus three ``entities worker``
processes share the counters while workers are SIGKILLed, or while PostgreSQL itself restarts.

``test_workers_killed``: 2,000 ``{"add": v}`` sends (distinct values) spread over 200 counters go
out concurrently over HTTP while a random worker is SIGKILLed every few hundred milliseconds and
restarted (leases of 2 s, so the killed worker's wakes are redelivered by the others).

``test_postgres_restarts``: the same deployment on a PostgreSQL cluster the test starts itself
(initdb into a temporary directory), restarted twice (``-m fast`` and ``-m immediate``) while the
sends and the wakes are under way; the server and the workers must reconnect and carry on.

A send answered ``202`` is *acknowledged*; a send that errors is *unknown* (it may or may not have
landed). Once nothing is pending any more, for every counter:

- its inbox message keys are unique and every acknowledged key is among them; every inbox value
  is one we sent to that counter;
- every inbox message has exactly one reply, and the replies are the running totals in inbox
  order; the final ``totals.total.value`` is the sum of its inbox;
- no two committed runs (``runs`` events) carry the same fencing ``epoch``;
- the entity is idle, with nothing pending.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from entities import Runtime
from entities._records import ENTITY_NS, EntityRecord
from examples.counter import registry
from streams import open_store
from tests import _postgres

from ._support import EntitiesProcess, free_port

# test_workers_killed skips (or fails under ENTITIES_REQUIRE_POSTGRES=1) in its shared_db fixture
# where no test server answers; test_postgres_restarts runs its own cluster
pytestmark = [pytest.mark.postgres, pytest.mark.slow]

logger = logging.getLogger(__name__)

APP = "examples/counter.py:registry"
LEASE_SECONDS = "2"
WORKERS = 3
SENDERS = 48
SENDS_RESTART = 1500  # over 100 counters, while PostgreSQL restarts twice
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Ledger:
    acked: dict[int, str] = field(default_factory=dict)  # value -> message key
    unknown: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


@dataclass
class Deployment:
    server: EntitiesProcess
    workers: list[EntitiesProcess]
    db: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def start(self) -> None:
        """Start everything; return once the server listens and every worker opened its
        store (it says so on stderr)."""
        self.server.start(timeout=30)
        for worker in self.workers:
            worker.start()
        deadline = time.monotonic() + 30
        for worker in self.workers:
            while "entities: worker" not in worker.output():
                assert worker.proc is not None and worker.proc.poll() is None, worker.output()
                assert time.monotonic() < deadline, worker.output()
                time.sleep(0.05)

    def kill_all(self) -> None:
        for process in (self.server, *self.workers):
            process.kill()

    def logs(self) -> str:
        parts = []
        for process in (self.server, *self.workers):
            state = "running" if process.proc and process.proc.poll() is None else "exited"
            parts.append(f"--- {' '.join(process.args[1:3])} ({process.log.name}, {state})")
            parts.append(process.output()[-3000:])
        return "\n".join(parts)


def _deployment(db: str, logs: Path) -> Deployment:
    port = free_port()
    common = ["--db", db, "--lease-seconds", LEASE_SECONDS]
    server = EntitiesProcess(
        ["serve", APP, *common, "--port", str(port), "--no-worker"],
        log=logs / "serve.log",
        port=port,
    )
    workers = [
        EntitiesProcess(
            ["worker", APP, *common, "--worker-id", f"w{i}"], log=logs / f"worker{i}.log"
        )
        for i in range(WORKERS)
    ]
    return Deployment(server, workers, db)


# -- the shared PostgreSQL server ---------------------------------------------------------------


@pytest.fixture
def shared_db() -> Iterator[str]:
    _postgres.check()
    url = _postgres.fresh_url()
    try:
        yield url
    finally:
        _postgres.drop_schema_sync(url)


# -- a dedicated cluster ------------------------------------------------------------------------


class Cluster:
    """A throwaway PostgreSQL cluster (trust auth, no fsync) on a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*args]
        if self.as_root:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=check)

    def init(self) -> None:
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            # no fsync (fast; safe here: only the server process dies, never the OS), but
            # synchronous commits: an acknowledged commit must survive -m immediate
            "-c fsync=off"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
        )

    def restart(self, mode: str) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.start()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop",
                check=False,
            )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?schema=chaos"


def _cluster_unavailable() -> str | None:
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        return f"no initdb/pg_ctl in {PG_BIN}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and no runuser to run initdb as postgres"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run initdb as"
    return None


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    reason = _cluster_unavailable()
    if reason is not None:
        if _postgres.required():
            pytest.fail(f"{_postgres.REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(f"cannot run a dedicated PostgreSQL cluster: {reason}")
    root = Path(tempfile.mkdtemp(prefix="entities-pg-"))
    os.chmod(root, 0o755)
    found = Cluster(root)
    try:
        found.init()
        found.start()
        yield found
    finally:
        found.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- the scenario --------------------------------------------------------------------------------


async def _spawn_all(http: httpx2.AsyncClient, counters: int) -> None:
    async def spawn(n: int) -> None:
        response = await http.put(f"/_entities/entities/counter/n{n}", json={})
        assert response.status_code == 201, response.text

    for start in range(0, counters, SENDERS):
        await asyncio.gather(*(spawn(n) for n in range(start, min(counters, start + SENDERS))))


async def _send_all(http: httpx2.AsyncClient, plan: list[tuple[int, int]], ledger: Ledger) -> None:
    queue = iter(plan)

    async def sender() -> None:
        for n, value in queue:
            url = f"/_entities/entities/counter/n{n}/send"
            try:
                response = await http.post(url, json={"payload": {"add": value}})
            except httpx2.TransportError as exc:
                ledger.unknown.add(value)
                ledger.errors.append(repr(exc))
                continue
            if response.status_code == 202:
                ledger.acked[value] = response.json()["key"]
            else:
                ledger.unknown.add(value)
                ledger.errors.append(f"{response.status_code} {response.text[:200]}")

    await asyncio.gather(*(sender() for _ in range(SENDERS)))


async def _settle(http: httpx2.AsyncClient, seconds: float, deployment: Deployment) -> None:
    deadline = time.monotonic() + seconds
    busy: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            listing: list[dict[str, Any]] = (await http.get("/_entities/entities")).json()
        except httpx2.TransportError:
            await asyncio.sleep(0.2)
            continue
        busy = [e for e in listing if e["pending"] or e["status"] == "running"]
        if not busy:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"still busy after {seconds} s: {busy[:5]}\n{deployment.logs()}")


async def _check(
    deployment: Deployment,
    http: httpx2.AsyncClient,
    plan: list[tuple[int, int]],
    ledger: Ledger,
    counters: int,
    context: str,
) -> int:
    """Assert the outcome of every counter; return how many wakes were redelivered."""
    owner = dict((v, n) for n, v in plan)
    listing: list[dict[str, Any]] = (await http.get("/_entities/entities")).json()
    assert len(listing) == counters, context
    stuck = [e for e in listing if e["pending"] or e["status"] != "idle" or e["queue"]]
    assert not stuck, (context, stuck[:5])
    redelivered = 0
    async with Runtime(registry, deployment.db) as rt:
        for n in range(counters):
            url = f"/counter/n{n}"
            events, _ = await rt.read(url, limit=1_000_000)
            inbox = [
                (e["key"], e["value"]["payload"]["add"]) for e in events if e["type"] == "inbox"
            ]
            keys = [k for k, _ in inbox]
            assert len(set(keys)) == len(keys), (url, "an inbox key appears twice", context)
            for _key, value in inbox:
                assert owner.get(value) == n, (url, value, "never sent here", context)
                assert value in ledger.acked or value in ledger.unknown, (url, value, context)
            mine = {v for m, v in plan if m == n}
            for value in mine & ledger.acked.keys():
                assert ledger.acked[value] in keys, (url, value, "acknowledged but lost", context)
            replies: dict[str, list[Any]] = {}
            for e in events:
                if e["type"] == "texts":
                    replies.setdefault(e["value"]["in_reply_to"], []).append(e["value"]["value"])
            running = 0
            for key, value in inbox:
                running += value
                assert replies.get(key) == [running], (url, key, replies.get(key), context)
            assert set(replies) == set(keys), (url, "replies to unknown messages", context)
            state = await rt.state_of(url)
            total = state["totals"].get("total", {"value": 0})["value"]
            assert total == running == sum(v for _, v in inbox), (url, total, running, context)
            runs = [e["value"] for e in events if e["type"] == "runs"]
            epochs = [r["epoch"] for r in runs]
            assert len(set(epochs)) == len(epochs), (url, "two runs share an epoch", epochs)
            redelivered += sum(1 for r in runs if r["attempt"] > 1)
            info = await rt.get(url)
            assert info is not None and not info.pending and info.status == "idle", (url, info)
    return redelivered


Chaos = Callable[[Deployment, Ledger, asyncio.Event, random.Random], Coroutine[Any, Any, int]]


async def _scenario(
    deployment: Deployment, counters: int, sends: int, chaos: Chaos, seed: int
) -> tuple[Ledger, int, int]:
    rng = random.Random(seed)
    values = list(range(1, sends + 1))
    rng.shuffle(values)
    plan = [(i % counters, v) for i, v in enumerate(values)]
    rng.shuffle(plan)
    ledger = Ledger()
    await asyncio.to_thread(deployment.start)
    limits = httpx2.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
    async with httpx2.AsyncClient(base_url=deployment.base, timeout=30, limits=limits) as http:
        await _spawn_all(http, counters)
        done = asyncio.Event()
        disruptor = asyncio.create_task(chaos(deployment, ledger, done, rng))
        began = time.monotonic()
        try:
            await _send_all(http, plan, ledger)
        finally:
            done.set()
            disruptions = await disruptor
        sent = time.monotonic()
        await _settle(http, 60, deployment)
        context = (
            f"seed={seed} disruptions={disruptions} acked={len(ledger.acked)} "
            f"sending={sent - began:.1f}s settling={time.monotonic() - sent:.1f}s "
            f"unknown={len(ledger.unknown)} errors={ledger.errors[:3]}"
        )
        assert len(ledger.acked) + len(ledger.unknown) == sends, context
        for process in deployment.workers:  # every worker outlived the chaos (or its restart)
            assert process.proc is not None and process.proc.poll() is None, (
                context,
                process.output()[-3000:],
            )
        redelivered = await _check(deployment, http, plan, ledger, counters, context)
    logger.info("%s redelivered=%d", context, redelivered)  # --log-cli-level=INFO shows it
    return ledger, disruptions, redelivered


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Deployment]]:
    started: list[Deployment] = []
    try:
        yield started
    finally:
        for deployment in started:
            deployment.kill_all()


async def test_workers_killed(shared_db: str, tmp_path: Path, cleanup: list[Deployment]) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    deployment = _deployment(shared_db, tmp_path)
    cleanup.append(deployment)

    async def kill_workers(
        d: Deployment, ledger: Ledger, done: asyncio.Event, rng: random.Random
    ) -> int:
        """Every 200-500 ms (50-150 ms for the first five), or after 120 more answered sends if
        that comes first (so a fast machine sees as many kills), SIGKILL a worker and restart
        it: one seen holding a lease (wakes take milliseconds, so a random victim is often
        idle) until a kill has caught a wake in flight, then every other time; else a random
        one. At least five kills, the last of them after the sends if those finish first."""
        kills = 0
        hit = False  # whether a kill has caught a worker in the middle of a wake yet

        async def owners() -> set[str | None]:
            records = (EntityRecord.load(raw) for _key, raw in await store.kv_scan(ENTITY_NS))
            return {record.owner for record in records if record.status == "running"}

        async with open_store(d.db) as store:
            # at least five kills: on a fast run the sends may all be acknowledged first, and
            # the kills then land while the workers still run the wakes they queued
            while not done.is_set() or kills < 5:
                answered = len(ledger.acked) + len(ledger.unknown)
                # the first five kills come sooner: a loaded machine (CI on 2 cores) may finish
                # the sends in a few seconds, and the test wants at least five
                pause = rng.uniform(0.05, 0.15) if kills < 5 else rng.uniform(0.2, 0.5)
                deadline = time.monotonic() + pause
                while time.monotonic() < deadline and not done.is_set():
                    if len(ledger.acked) + len(ledger.unknown) >= answered + 120:
                        break
                    await asyncio.sleep(0.005)
                if done.is_set() and kills >= 5:
                    break
                busy: list[EntitiesProcess] = []
                # every other kill: look (for up to a second) until a worker holds a lease,
                # and kill it at once (a single look finds none about half of the time, and
                # then no kill may hit a wake in flight)
                patience = time.monotonic() + 1.0
                while (kills % 2 == 0 or not hit) and not busy and time.monotonic() < patience:
                    running = await owners()
                    busy = [w for i, w in enumerate(d.workers) if f"w{i}" in running]
                    if not busy:
                        await asyncio.sleep(0.002)
                victim = rng.choice(busy or d.workers)
                victim.kill()
                kills += 1
                if busy and not hit:  # did the kill catch its wake before the commit?
                    hit = f"w{d.workers.index(victim)}" in await owners()
                await asyncio.sleep(rng.uniform(0.0, 0.1))
                victim.start()
        return kills

    ledger, kills, redelivered = await _scenario(deployment, 200, 2000, kill_workers, seed)
    # neither the server nor the database went away: every send was acknowledged
    assert len(ledger.acked) == 2000, (seed, ledger.errors[:5])
    assert kills >= 5, (seed, kills)
    assert redelivered >= 1, (seed, kills, "no kill hit a wake in flight")


async def test_postgres_restarts(
    cluster: Cluster, tmp_path: Path, cleanup: list[Deployment]
) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    deployment = _deployment(cluster.url, tmp_path)
    cleanup.append(deployment)

    async def restart_postgres(
        d: Deployment, ledger: Ledger, done: asyncio.Event, rng: random.Random
    ) -> int:
        """Restart the cluster once a fifth of the sends went out, and again at three fifths."""
        restarts = 0
        for mode, fraction in (("fast", 0.2), ("immediate", 0.6)):
            while len(ledger.acked) + len(ledger.unknown) < SENDS_RESTART * fraction:
                if done.is_set():
                    return restarts
                await asyncio.sleep(0.01)
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            await asyncio.to_thread(cluster.restart, mode)
            restarts += 1
        return restarts

    ledger, restarts, _ = await _scenario(deployment, 100, SENDS_RESTART, restart_postgres, seed)
    assert restarts == 2, (seed, restarts, "the sends finished before the restarts")
    assert len(ledger.acked) >= SENDS_RESTART // 2, (seed, len(ledger.acked), ledger.errors[:5])
