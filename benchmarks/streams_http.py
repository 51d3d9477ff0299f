"""HTTP benchmark of the Durable Streams server over SQLite, on loopback.

    python benchmarks/streams_http.py [--quick] [--subscribers 100] [--db URL]

Starts ``python -m streams serve`` in a subprocess, then measures:

* appends/s over HTTP (concurrent keep-alive connections, small text messages, a lean
  raw-socket client), against a baseline measured in the same run: appends/s straight into the
  same kind of store, in-process;
* SSE delivery latency: ``--subscribers`` SSE connections tail one stream; the time from just
  before each ``POST`` to each subscriber's receipt of that message (p50/p99 over every
  subscriber x message pair). Subscribers use a minimal raw-socket SSE reader so the client's own
  overhead stays small next to the server's.

Prints a table, then as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx2

import streams

ROOT = Path(__file__).resolve().parents[1]
RUN = uuid.uuid4().hex[:8]  # stream names of this run (a reused --url server keeps old ones)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with httpx2.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                await client.get(url + "/v1/stream/__probe__")
                return
            except httpx2.TransportError:
                await asyncio.sleep(0.05)
    raise RuntimeError("the server did not start")


async def baseline_appends(db: str, total: int, writers: int) -> float:
    """Appends/s straight into a store (no HTTP), with the same concurrency."""
    async with streams.open_store(db) as store:
        await store.create("baseline", content_type="text/plain")
        per_writer = total // writers

        async def writer() -> None:
            for _ in range(per_writer):
                await store.append("baseline", [b"x" * 32], content_type="text/plain")

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        return per_writer * writers / (time.perf_counter() - started)


async def http_appends(base: str, total: int, writers: int) -> float:
    """Appends/s over HTTP/1.1 keep-alive connections (a lean raw-socket client)."""
    host, port = base.removeprefix("http://").split(":")
    path = f"/v1/stream/bench/{RUN}/appends"
    async with httpx2.AsyncClient(timeout=30) as client:
        await client.put(base + path, headers={"Content-Type": "text/plain"})
    per_writer = total // writers
    body = b"x" * 32
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def writer() -> None:
        reader, stream = await asyncio.open_connection(host, int(port))
        try:
            for _ in range(per_writer):
                stream.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 204"):
                    raise RuntimeError(f"append failed: {head[:40]!r}")
        finally:
            stream.close()

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return per_writer * writers / (time.perf_counter() - started)


class Subscriber:
    """A minimal SSE reader over a raw socket: records when each message arrives."""

    def __init__(self) -> None:
        self.received: dict[int, float] = {}
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self, host: str, port: int, path: str) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        request = (
            f"GET {path}?offset=-1&live=sse HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        )
        writer.write(request.encode())
        await writer.drain()
        buffer = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                now = time.perf_counter()
                buffer += chunk
                # chunked transfer framing lines never contain "data:m", so scan the raw bytes
                *complete, buffer = buffer.split(b"\n\n")
                for block in complete:
                    if b"event: control" in block:
                        self.ready.set()
                    for line in block.split(b"\n"):
                        if line.startswith(b"data:m"):
                            for item in line[5:].split(b";"):
                                if item.startswith(b"m"):
                                    self.received.setdefault(int(item[1:]), now)
        finally:
            writer.close()


async def sse_latency(base: str, subscribers: int, messages: int) -> list[float]:
    host, port = base.removeprefix("http://").split(":")
    path = f"/v1/stream/bench/{RUN}/sse"
    async with httpx2.AsyncClient(timeout=30) as client:
        await client.put(base + path, headers={"Content-Type": "text/plain"})
        subs = [Subscriber() for _ in range(subscribers)]
        for sub in subs:
            sub.task = asyncio.create_task(sub.run(host, int(port), path))
        await asyncio.wait_for(asyncio.gather(*(sub.ready.wait() for sub in subs)), 30)
        sent: dict[int, float] = {}
        for number in range(messages):
            sent[number] = time.perf_counter()
            response = await client.post(
                base + path, content=f"m{number};".encode(), headers={"Content-Type": "text/plain"}
            )
            if response.status_code != 204:
                raise RuntimeError(f"append failed: {response.status_code}")
            deadline = time.perf_counter() + 5
            while any(number not in sub.received for sub in subs):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"message {number} did not reach every subscriber")
                await asyncio.sleep(0.0005)
            await asyncio.sleep(0.005)
        for sub in subs:
            assert sub.task is not None
            sub.task.cancel()
        await asyncio.gather(*(sub.task for sub in subs if sub.task), return_exceptions=True)
    return [
        (sub.received[number] - sent[number]) * 1000 for sub in subs for number in range(messages)
    ]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(args: argparse.Namespace, base: str, tmp: str) -> dict[str, object]:
    baseline = await baseline_appends(
        f"sqlite:///{Path(tmp) / 'baseline.db'}", args.appends, args.writers
    )
    appends = await http_appends(base, args.appends, args.writers)
    latencies = await sse_latency(base, args.subscribers, args.messages)
    return {
        "appends_per_s": round(appends, 1),
        "baseline_appends_per_s": round(baseline, 1),
        "http_vs_baseline": round(appends / baseline, 3),
        "sse_p50_ms": round(percentile(latencies, 0.50), 3),
        "sse_p99_ms": round(percentile(latencies, 0.99), 3),
        "sse_mean_ms": round(statistics.fmean(latencies), 3),
        "subscribers": args.subscribers,
        "sse_messages": args.messages,
        "writers": args.writers,
        "appends": args.appends,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="streams-bench-") as tmp:
        if args.url:  # a server someone else runs (e.g. under a profiler)
            return asyncio.run(measure(args, args.url.rstrip("/"), tmp))
        db = args.db or f"sqlite:///{Path(tmp) / 'server.db'}"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "streams", "serve", "--db", db, "--port", str(port),
             "--log-level", "warning"],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            asyncio.run(wait_ready(base, server))
            return asyncio.run(measure(args, base, tmp))
        finally:
            server.terminate()
            server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a short run (well under 30 s)")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--db", help="server store URL (default: a fresh SQLite file)")
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    args = parser.parse_args()
    args.appends = 2000 if args.quick else 20000
    args.messages = 30 if args.quick else 200
    result = run(args)
    print(f"{'metric':<28}{'value':>14}")
    print(f"{'HTTP appends/s':<28}{result['appends_per_s']:>14}")
    print(f"{'in-process appends/s':<28}{result['baseline_appends_per_s']:>14}")
    print(f"{'HTTP / in-process':<28}{result['http_vs_baseline']:>14}")
    label = f"SSE p50 ms ({args.subscribers} subs)"
    print(f"{label:<28}{result['sse_p50_ms']:>14}")
    print(f"{'SSE p99 ms':<28}{result['sse_p99_ms']:>14}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
