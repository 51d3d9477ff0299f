"""Request-response against one-way sends over HTTP, through ``entities serve`` (its embedded
worker), on SQLite and PostgreSQL.

    python benchmarks/request_response.py [--quick] [--db postgresql://user@host:port/db]

A fresh server process per measurement (a new SQLite file, or a new PostgreSQL schema dropped
afterwards), clients in this process (``httpx2``, ``CONCURRENCY`` requests in flight). The two
measurements of each ratio run side by side: both servers up, half of each one's messages, then
the other's, in the order A, B, B, A (this machine's speed drifts by a fifth within a minute, so
one measurement after the other compared two moments of the machine as much as two modes):

- ``oneway``: ``MESSAGES`` sends over ``COUNTERS`` counters (``POST …/send``), timed until every
  message was applied (the listing shows nothing pending or running);
- ``rr``: the same messages as calls (``POST …/call``: the reply in the response; on a server
  without it, ``send`` then ``GET …/replies/{key}?wait_ms=``), timed until the last answer;
- ``hot``: ``HOT`` messages to one counter, one-way and request-response;
- ``seq``: sequential calls to one counter, p50 and p99 of the round trip, per backend;
- ``steps``: request-response to a type that journals three steps per message against one
  that journals one.

Server CPU per message is the server process's CPU (its HTTP side and its worker thread, from
/proc) over the measurement, divided by the messages. Prints a table, then, as its last line,
one JSON object: ``rr_to_oneway_ratio`` / ``rr_cpu_ratio`` (SQLite; ``pg_…`` the same on
PostgreSQL), ``hot_key_ratio``, ``pg_to_sqlite_p50_ratio``, ``three_steps_ratio`` and the figures
behind them. ``--db`` defaults to ``ENTITIES_BENCH_POSTGRES_URL``, else
``ENTITIES_TEST_POSTGRES_URL``, else ``postgresql://postgres@127.0.0.1:5432/test``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scale_out import drop_schema, fresh_url  # noqa: E402  (benchmarks/ is on sys.path)

from entities import HandlerContext, Registry, WakeEvent, collection  # noqa: E402

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/test"
COUNTERS = 100
CONCURRENCY = 32

registry = Registry()


class Total(BaseModel):
    key: str
    value: int = 0


@registry.define("counter", state={"totals": collection(Total, primary_key="key")})
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    totals = ctx.db.collections.totals
    current = totals.get("total")
    total = 0 if current is None else current.value
    for message in wake.messages:
        total += int(message.payload.get("add", 0))
        ctx.reply(total, to=message)
    if wake.messages:
        row = Total(key="total", value=total)
        if current is None:
            ctx.db.actions.totals_insert(row=row)
        else:
            ctx.db.actions.totals_update(key="total", updater=row)


def _stepper(steps: int) -> Callable[[HandlerContext, WakeEvent], Awaitable[None]]:
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        for message in wake.messages:
            value = 0
            for n in range(steps):
                value = await ctx.step(f"{message.key}:{n}", lambda v=value: v + 1)
            ctx.reply(value, to=message)

    return handler


registry.define("step1")(_stepper(1))
registry.define("step3")(_stepper(3))


# -- the server ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``entities serve`` over a fresh store of ``backend``."""

    def __init__(self, backend: str, pg: str, directory: Path) -> None:
        self.backend = backend
        self.db = (
            f"sqlite:///{directory / f'{uuid.uuid4().hex[:8]}.db'}"
            if backend == "sqlite"
            else fresh_url(pg)
        )
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "serve.log"

    async def __aenter__(self) -> Server:
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's packages first
        command = [
            sys.executable, "-m", "entities.cli", "serve",
            "benchmarks/request_response.py:registry", "--db", self.db,
            "--port", str(self.port), "--compact-every", "0",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        async with httpx2.AsyncClient(base_url=self.base) as http:
            while True:
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return self
                except httpx2.TransportError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")
                await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.backend == "postgres":
            await drop_schema(self.db)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        assert self.proc is not None
        return _cpu(self.proc.pid)


# -- clients ------------------------------------------------------------------------------------


async def _bounded(calls: list[Callable[[], Awaitable[Any]]], width: int) -> None:
    queue = list(reversed(calls))

    async def lane() -> None:
        while queue:
            await queue.pop()()

    await asyncio.gather(*(lane() for _ in range(width)))


class Client:
    def __init__(self, http: httpx2.AsyncClient) -> None:
        self.http = http
        self.has_call = True

    async def probe(self, url: str) -> None:
        """Whether the server has ``POST …/call`` (else: send, then wait for the replies)."""
        response = await self.http.post(
            f"/_entities/entities{url}/call", json={"payload": {"add": 0}, "wait_ms": 0}
        )
        self.has_call = response.status_code != 404 and response.status_code != 405

    async def spawn(self, url: str) -> None:
        response = await self.http.put(f"/_entities/entities{url}", json={})
        assert response.status_code == 201, response.text

    async def send(self, url: str, payload: Any) -> None:
        response = await self.http.post(f"/_entities/entities{url}/send", json={"payload": payload})
        assert response.status_code == 202, response.text

    async def call(self, url: str, payload: Any) -> Any:
        if self.has_call:
            response = await self.http.post(
                f"/_entities/entities{url}/call", json={"payload": payload, "wait_ms": 60_000}
            )
            assert response.status_code == 200 and response.json()["replies"], response.text
            return response.json()["replies"]
        sent = await self.http.post(f"/_entities/entities{url}/send", json={"payload": payload})
        receipt = sent.json()
        answer = await self.http.get(
            f"/_entities/entities{url}/replies/{receipt['key']}",
            params={"wait_ms": 60_000, "after": receipt["offset"]},
        )
        replies = answer.json()["replies"]
        assert replies, answer.text
        return replies

    async def idle(self) -> None:
        """Wait until no entity has a wake pending or running."""
        while True:
            listing = (await self.http.get("/_entities/entities")).json()
            if not any(e["pending"] or e["status"] == "running" for e in listing):
                return
            await asyncio.sleep(0.02)


class Measurement:
    """One measurement on a fresh server: ``kind`` is ``oneway``, ``rr`` or ``seq`` (sequential
    calls: p50/p99 in ms), over ``entities`` entities of ``type_``. Run it in slices
    (:meth:`run`); :meth:`result` gives messages per second and server CPU per message (ms)
    over all of them."""

    def __init__(
        self,
        backend: str,
        pg: str,
        directory: Path,
        kind: str,
        *,
        entities: int,
        type_: str = "counter",
        width: int = CONCURRENCY,
    ) -> None:
        self.kind, self.width = kind, width
        self.server = Server(backend, pg, directory)
        self.urls = [f"/{type_}/e{i}" for i in range(entities)]
        self.sent = self.elapsed = self.cpu = 0.0
        self.latencies: list[float] = []
        self._stack = contextlib.AsyncExitStack()
        self.client: Client | None = None

    async def __aenter__(self) -> Measurement:
        server = await self._stack.enter_async_context(self.server)
        http = await self._stack.enter_async_context(
            httpx2.AsyncClient(base_url=server.base, timeout=120)
        )
        client = self.client = Client(http)
        await _bounded([lambda u=u: client.spawn(u) for u in self.urls], 16)  # type: ignore[misc]
        await client.idle()
        await client.probe(self.urls[0])
        # warm-up: one call per entity (caches, connections, the first wake)
        await _bounded([lambda u=u: client.call(u, {"add": 0}) for u in self.urls], self.width)  # type: ignore[misc]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def warm(self, messages: int) -> None:
        """``messages`` messages as :meth:`run` sends them, not counted (the mode's own warm-up:
        right after both servers of a pair started, the first measured slice ran a fifth slower
        than the later ones)."""
        sent, elapsed, cpu, latencies = self.sent, self.elapsed, self.cpu, list(self.latencies)
        await self.run(messages)
        self.sent, self.elapsed, self.cpu, self.latencies = sent, elapsed, cpu, latencies

    async def run(self, messages: int) -> None:
        """``messages`` more messages, timed (and their server CPU counted)."""
        client, server = self.client, self.server
        assert client is not None
        first = int(self.sent)
        targets = [self.urls[i % len(self.urls)] for i in range(first, first + messages)]
        cpu, start = server.cpu(), time.perf_counter()
        if self.kind == "oneway":
            await _bounded([lambda u=u: client.send(u, {"add": 1}) for u in targets], self.width)  # type: ignore[misc]
            await client.idle()
        elif self.kind == "rr":
            await _bounded([lambda u=u: client.call(u, {"add": 1}) for u in targets], self.width)  # type: ignore[misc]
        else:
            for u in targets:
                began = time.perf_counter()
                await client.call(u, {"add": 1})
                self.latencies.append((time.perf_counter() - began) * 1000)
        self.elapsed += time.perf_counter() - start
        self.cpu += server.cpu() - cpu
        self.sent += messages

    def result(self) -> dict[str, float]:
        assert self.client is not None
        result = {
            "per_s": self.sent / self.elapsed,
            "cpu_ms": self.cpu * 1000 / self.sent,
            "call": 1.0 if self.client.has_call else 0.0,
        }
        if self.latencies:
            ordered = sorted(self.latencies)
            result["p50_ms"] = statistics.median(ordered)
            result["p99_ms"] = ordered[int(len(ordered) * 0.99) - 1]
        return result


async def side_by_side(
    first: Measurement, second: Measurement, messages: int
) -> tuple[dict[str, float], dict[str, float]]:
    """``messages`` of each of two measurements whose ratio is reported, interleaved on live
    servers in the order first, second, second, first (half of the messages each time): the
    machine's speed drifts by a fifth or more within a minute here (the client's own CPU per
    message moves with it), so two measurements taken one after the other compare the
    machine's moments as much as the two modes; taken this way both see the same moments."""
    async with first, second:
        half = messages // 2
        for measurement in (first, second):
            await measurement.warm(max(1, messages // 10))
        for measurement in (first, second, second, first):
            await measurement.run(half)
    return first.result(), second.result()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--db", default=None)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    pg = (
        args.db
        or os.environ.get("ENTITIES_BENCH_POSTGRES_URL")
        or os.environ.get("ENTITIES_TEST_POSTGRES_URL")
        or DEFAULT_DB
    )
    # the sizes the targets name (2,000 messages; 1,000 to the hot key) in both modes: a
    # shorter run measures the start and the end more than the rate; --quick runs one round
    messages, hot = 2000, 1000
    sequential = 100 if args.quick else 300
    rounds = 1 if args.quick else 3
    backends = ["sqlite"] if args.skip_postgres else ["sqlite", "postgres"]
    figures: dict[str, list[dict[str, float]]] = {}

    def add(name: str, value: dict[str, float]) -> None:
        figures.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for _ in range(rounds):  # interleaved: each pair sees the machine in the same state

            def make(backend: str, kind: str, entities: int, type_: str = "counter") -> Measurement:
                return Measurement(backend, pg, directory, kind, entities=entities, type_=type_)

            for backend in backends:
                oneway, rr = await side_by_side(
                    make(backend, "oneway", COUNTERS), make(backend, "rr", COUNTERS), messages
                )
                add(f"{backend}_oneway", oneway)
                add(f"{backend}_rr", rr)
            if "postgres" in backends:
                sqlite_seq, pg_seq = await side_by_side(
                    make("sqlite", "seq", 1), make("postgres", "seq", 1), sequential
                )
                add("sqlite_seq", sqlite_seq)
                add("postgres_seq", pg_seq)
            else:
                one = make("sqlite", "seq", 1)
                async with one:
                    await one.run(sequential)
                add("sqlite_seq", one.result())
            hot_oneway, hot_rr = await side_by_side(
                make("sqlite", "oneway", 1), make("sqlite", "rr", 1), hot
            )
            add("hot_oneway", hot_oneway)
            add("hot_rr", hot_rr)
            step1, step3 = await side_by_side(
                make("sqlite", "rr", COUNTERS, "step1"),
                make("sqlite", "rr", COUNTERS, "step3"),
                messages,
            )
            add("step1", step1)
            add("step3", step3)

    def med(name: str, field: str) -> float:
        return statistics.median(f[field] for f in figures[name])

    print(f"{'measurement':<16} {'msg/s':>9} {'server CPU ms/msg':>18} {'p50 ms':>8} {'p99 ms':>8}")
    for name in figures:
        p50 = f"{med(name, 'p50_ms'):8.2f}" if "p50_ms" in figures[name][0] else f"{'-':>8}"
        p99 = f"{med(name, 'p99_ms'):8.2f}" if "p99_ms" in figures[name][0] else f"{'-':>8}"
        print(f"{name:<16} {med(name, 'per_s'):9.1f} {med(name, 'cpu_ms'):18.2f} {p50} {p99}")
    out: dict[str, Any] = {
        "call_endpoint": bool(med("sqlite_rr", "call")),
        "messages": messages,
        "concurrency": CONCURRENCY,
        "sqlite_oneway_per_s": round(med("sqlite_oneway", "per_s"), 1),
        "sqlite_rr_per_s": round(med("sqlite_rr", "per_s"), 1),
        "rr_to_oneway_ratio": round(med("sqlite_rr", "per_s") / med("sqlite_oneway", "per_s"), 3),
        "rr_cpu_ratio": round(med("sqlite_rr", "cpu_ms") / med("sqlite_oneway", "cpu_ms"), 3),
        "sqlite_oneway_cpu_ms": round(med("sqlite_oneway", "cpu_ms"), 3),
        "sqlite_rr_cpu_ms": round(med("sqlite_rr", "cpu_ms"), 3),
        "hot_oneway_per_s": round(med("hot_oneway", "per_s"), 1),
        "hot_rr_per_s": round(med("hot_rr", "per_s"), 1),
        "hot_key_ratio": round(med("hot_rr", "per_s") / med("hot_oneway", "per_s"), 3),
        "sqlite_seq_p50_ms": round(med("sqlite_seq", "p50_ms"), 2),
        "step1_rr_per_s": round(med("step1", "per_s"), 1),
        "step3_rr_per_s": round(med("step3", "per_s"), 1),
        "three_steps_ratio": round(med("step3", "per_s") / med("step1", "per_s"), 3),
    }
    if "postgres" in backends:
        out |= {
            "pg_oneway_per_s": round(med("postgres_oneway", "per_s"), 1),
            "pg_rr_per_s": round(med("postgres_rr", "per_s"), 1),
            "pg_rr_to_oneway_ratio": round(
                med("postgres_rr", "per_s") / med("postgres_oneway", "per_s"), 3
            ),
            "pg_rr_cpu_ratio": round(
                med("postgres_rr", "cpu_ms") / med("postgres_oneway", "cpu_ms"), 3
            ),
            "pg_seq_p50_ms": round(med("postgres_seq", "p50_ms"), 2),
            "pg_to_sqlite_p50_ratio": round(
                med("postgres_seq", "p50_ms") / med("sqlite_seq", "p50_ms"), 3
            ),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
