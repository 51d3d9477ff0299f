"""The long-running commands freeze their start-up heap and collect the young generation less
often (see ``entities.cli._heap``); ``ENTITIES_GC=default`` keeps CPython's settings."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ._support import REPO, EntitiesProcess, cli_env, free_port

PROBE = (
    "import gc, json\n"
    "from entities.cli._heap import settle_heap\n"
    "before = gc.get_threshold()\n"
    "done = settle_heap()\n"
    "print(json.dumps([done, before, gc.get_threshold(), gc.get_freeze_count()]))\n"
)


def _probe(**env: str) -> list[object]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env={**cli_env(), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    value = json.loads(result.stdout)
    assert isinstance(value, list)
    return value


def test_settling_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    done, before, after, frozen = _probe()
    assert done is True and before != after
    assert after == [10_000, 20, 20]
    assert isinstance(frozen, int) and frozen > 10_000  # modules, classes, functions


def test_entities_gc_default_keeps_cpythons_settings() -> None:
    done, before, after, frozen = _probe(ENTITIES_GC="default")
    assert done is False and after == before and frozen == 0


def test_serve_and_worker_settle_their_heap_once_started(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'heap.db'}"
    app = "tests.entities.apps.calls:registry"
    serve_port = free_port()
    for args, port in (
        (["-vv", "worker", app, "--db", db], None),
        (["-vv", "serve", app, "--db", db, "--port", str(serve_port)], serve_port),
    ):
        proc = EntitiesProcess(args, log=tmp_path / f"{args[1]}.log", port=port)
        proc.start()
        try:
            deadline = time.monotonic() + 20
            while "start-up objects" not in proc.output():
                assert time.monotonic() < deadline, proc.output()
                time.sleep(0.05)
        finally:
            proc.stop()
        assert "froze" in proc.output()
