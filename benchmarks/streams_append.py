"""Append and read throughput of the SQLite store, against raw ``sqlite3`` measured in the same run.

    python benchmarks/streams_append.py [--quick] [--repeat N]

Measures, each as the median of a few repetitions on fresh files in a temporary folder:

(a) baseline: stdlib ``sqlite3`` ``executemany`` of the same payloads into an equivalent table
    (``(stream_id, position, data)`` WITHOUT ROWID, WAL, ``synchronous=NORMAL``), one transaction
    per batch of the same size the store gets per append call. The single-transaction bulk rate is
    printed for context;
(b) the store: one task appending batches of ``--batch`` messages per ``append`` call;
(c) the store: 64 concurrent tasks appending single messages to one stream (group commit);
(d) reading everything back through the materialiser (State Protocol events decoded and folded).

Prints a table, then as the last line one JSON object with ``baseline_rows_per_s``,
``batched_per_s``, ``batched_ratio``, ``concurrent_single_per_s``, ``read_per_s`` and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import streams

T = TypeVar("T")
TARGETS = {"batched_ratio": 0.5, "concurrent_single_per_s": 20_000, "read_per_s": 200_000}


def make_payloads(count: int) -> list[bytes]:
    """State Protocol change events of roughly 100-150 bytes, as an entity stream holds."""
    return [
        streams.encode_event(
            streams.change(
                "state:rows",
                f"row-{i % 1000}",
                {"i": i, "text": f"message number {i}", "ok": i % 3 == 0},
                operation="update" if i >= 1000 else "insert",
                txid=f"tx-{i // 100}",
            )
        )
        for i in range(count)
    ]


def baseline(folder: Path, payloads: list[bytes], batch: int) -> tuple[float, float]:
    """Rows/s of raw sqlite3: (one transaction per ``batch`` rows, one transaction for all)."""
    rates = []
    for name, size in (("batched", batch), ("bulk", len(payloads))):
        path = folder / f"baseline-{name}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(
            "CREATE TABLE messages (stream_id INTEGER NOT NULL, position INTEGER NOT NULL, "
            "data BLOB NOT NULL, PRIMARY KEY (stream_id, position)) WITHOUT ROWID"
        )
        rows = [(1, i + 1, data) for i, data in enumerate(payloads)]
        started = time.perf_counter()
        for start in range(0, len(rows), size):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO messages (stream_id, position, data) VALUES (?,?,?)",
                rows[start : start + size],
            )
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        conn.close()
        rates.append(len(rows) / elapsed)
    return rates[0], rates[1]


async def store_batched(url: str, payloads: list[bytes], batch: int) -> tuple[float, float]:
    """Messages/s appending ``batch`` at a time from one task; then messages/s read back."""
    async with streams.open_store(url) as store:
        await store.create("bench", content_type="application/json")
        chunks = [payloads[i : i + batch] for i in range(0, len(payloads), batch)]
        started = time.perf_counter()
        for chunk in chunks:
            await store.append("bench", chunk)
        append_rate = len(payloads) / (time.perf_counter() - started)
        started = time.perf_counter()
        view = await streams.materialize(store, "bench", use_snapshot=False)
        read_rate = len(payloads) / (time.perf_counter() - started)
        assert view.applied == len(payloads), (view.applied, len(payloads))
        assert len(view.collection("state:rows")) == min(1000, len(payloads))
        return append_rate, read_rate


async def store_concurrent(url: str, payloads: list[bytes], tasks: int) -> float:
    """Messages/s with ``tasks`` tasks each appending single messages to one stream."""
    async with streams.open_store(url) as store:
        await store.create("bench", content_type="application/json")
        per_task = len(payloads) // tasks

        async def writer(task: int) -> None:
            for data in payloads[task * per_task : (task + 1) * per_task]:
                await store.append("bench", [data])

        started = time.perf_counter()
        await asyncio.gather(*(writer(t) for t in range(tasks)))
        rate = per_task * tasks / (time.perf_counter() - started)
        info = await store.head("bench")
        assert info.next_offset == streams.format_offset(per_task * tasks)
        return rate


def in_fresh_folder(run: Callable[[Path], T]) -> T:
    with tempfile.TemporaryDirectory(prefix="streams-bench-") as folder:
        return run(Path(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 30 s)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per measurement")
    parser.add_argument("--batch", type=int, default=100, help="messages per append call")
    parser.add_argument("--tasks", type=int, default=64, help="concurrent single-message tasks")
    args = parser.parse_args(argv)
    count = 100_000 if args.quick else 300_000
    concurrent_count = 25_600 if args.quick else 128_000
    repeat = args.repeat or 5
    payloads = make_payloads(count)

    def url(folder: Path) -> str:
        return f"sqlite:///{folder.resolve() / 'store.db'}"

    # Repetitions interleave the measurements so that a noisy neighbour hits them alike.
    samples: dict[str, list[float]] = {k: [] for k in ("base", "bulk", "batched", "read", "conc")}
    for _ in range(repeat):
        base, bulk = in_fresh_folder(lambda f: baseline(f, payloads, args.batch))
        append_rate, read_rate = in_fresh_folder(
            lambda f: asyncio.run(store_batched(url(f), payloads, args.batch))
        )
        concurrent_rate = in_fresh_folder(
            lambda f: asyncio.run(store_concurrent(url(f), payloads[:concurrent_count], args.tasks))
        )
        for key, value in (("base", base), ("bulk", bulk), ("batched", append_rate),
                           ("read", read_rate), ("conc", concurrent_rate)):  # fmt: skip
            samples[key].append(value)
    baseline_rate = statistics.median(samples["base"])
    bulk_rate = statistics.median(samples["bulk"])
    batched_rate = statistics.median(samples["batched"])
    read_rate = statistics.median(samples["read"])
    concurrent_rate = statistics.median(samples["conc"])
    ratio = batched_rate / baseline_rate
    result: dict[str, Any] = {
        "messages": count,
        "payload_bytes_avg": round(sum(map(len, payloads)) / count, 1),
        "batch": args.batch,
        "tasks": args.tasks,
        "repeat": repeat,
        "baseline_rows_per_s": round(baseline_rate),
        "baseline_bulk_rows_per_s": round(bulk_rate),
        "batched_per_s": round(batched_rate),
        "batched_ratio": round(ratio, 3),
        "concurrent_single_per_s": round(concurrent_rate),
        "read_per_s": round(read_rate),
        "targets": TARGETS,
    }
    result["targets_met"] = {
        "batched_ratio": ratio >= TARGETS["batched_ratio"],
        "concurrent_single_per_s": concurrent_rate >= TARGETS["concurrent_single_per_s"],
        "read_per_s": read_rate >= TARGETS["read_per_s"],
    }
    rows = [
        ("(a) raw sqlite3, executemany per batch", baseline_rate, "rows/s"),
        ("    raw sqlite3, one transaction", bulk_rate, "rows/s"),
        (f"(b) store, {args.batch} messages per append", batched_rate, "msg/s"),
        ("    ratio (b)/(a)", batched_rate / baseline_rate, ""),
        (f"(c) store, {args.tasks} tasks x single appends", concurrent_rate, "msg/s"),
        ("(d) materialize (decode + fold)", read_rate, "msg/s"),
    ]
    print(f"streams_append: {count} messages of ~{result['payload_bytes_avg']} B, "
          f"median of {repeat}")  # fmt: skip
    for label, value, unit in rows:
        shown = f"{value:,.3f}" if not unit else f"{value:,.0f}"
        print(f"  {label:<46} {shown:>14} {unit}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
