"""Bytes on disk before and after compaction, on a real SQLite file, with the scripted test model.

    python benchmarks/_compaction.py [--quick]

1,000 agent runs (``--quick``: 100) of 500 streamed tokens each, spread over entities of 10 runs
(``--quick``: 5): every token is a ``text_deltas`` event in the entity's stream, as with a real
provider. Then ``Runtime.compact()`` with the default retention (text deltas of ended runs go;
journal steps stay, being within the replay window). The size is measured honestly as the size
of a ``VACUUM INTO`` copy of the database (what the data occupies once free pages are returned;
the file itself keeps its pages for reuse until a ``VACUUM``), before and after. Prints a table,
then one JSON line; :func:`measure` returns the same figures (``compaction_saving`` is the
fraction by which the data got smaller; the target is >= 0.80).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.agent import ScriptRequest

TOKENS = 500

registry = Registry()


def _script(request: ScriptRequest) -> Any:
    return "".join(f"token{i} " for i in range(TOKENS))


@registry.define("agent")
async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
    if wake.messages:
        ctx.use_agent("You answer at length.", test_responses=_script, history=2)
        await ctx.agent.run()


def vacuumed_bytes(path: Path) -> int:
    """The size of a ``VACUUM INTO`` copy of the database at ``path``."""
    copy = path.with_name(path.name + ".vacuumed")
    copy.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM INTO ?", (str(copy),))
    finally:
        conn.close()
    size = copy.stat().st_size
    copy.unlink()
    return size


async def _run(quick: bool, directory: Path) -> dict[str, float]:
    runs, per_entity = (100, 5) if quick else (1000, 10)
    path = directory / "compaction.db"
    started = time.perf_counter()
    async with Runtime(registry, f"sqlite:///{path}", compact_every=None) as rt:
        entities = runs // per_entity
        for e in range(entities):
            await rt.spawn(f"/agent/a{e}")
        await rt.run_until_idle()
        for _ in range(per_entity):
            for e in range(entities):
                await rt.send(f"/agent/a{e}", {"text": "tell me more"})
            await rt.run_until_idle()
    generate = time.perf_counter() - started
    before = vacuumed_bytes(path)
    started = time.perf_counter()
    async with Runtime(registry, f"sqlite:///{path}", compact_every=None) as rt:
        report = await rt.compact()
    compact = time.perf_counter() - started
    after = vacuumed_bytes(path)
    return {
        "runs": runs,
        "tokens_per_run": TOKENS,
        "removed_events": report.events,
        "removed_event_bytes": report.bytes,
        "bytes_before": before,
        "bytes_after": after,
        "compaction_saving": round(1 - after / before, 4),
        "generate_seconds": round(generate, 2),
        "compact_seconds": round(compact, 2),
    }


def measure(quick: bool) -> dict[str, float]:
    """Run the benchmark (in its own event loop, in a temporary folder) and return its figures:
    ``compaction_saving``, ``bytes_before``, ``bytes_after`` and more (see the module)."""
    with tempfile.TemporaryDirectory() as tmp:
        return anyio.run(_run, quick, Path(tmp))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 runs instead of 1,000")
    figures = measure(parser.parse_args().quick)
    print(f"{'measure':<24}{'value':>14}")
    for key, value in figures.items():
        print(f"{key:<24}{value:>14}")
    print(json.dumps(figures))
