"""The official Durable Streams conformance suite (npm, pinned) against our server.

Runs ``python -m tests.conformance.run`` (a real uvicorn over each backend, the suite's own
vitest run) and requires every one of its 338 tests to pass. Needs Node and npm (the suite is
installed from the npm registry on first use). PostgreSQL runs in a fresh schema, dropped
afterwards, where a server answers (see :mod:`tests._postgres`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import _postgres

ROOT = Path(__file__).resolve().parents[2]
SUITE_TESTS = 338


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "backend",
    ["memory", "sqlite", pytest.param("postgres", marks=_postgres.marks())],
)
def test_official_conformance_suite(backend: str, tmp_path: Path) -> None:
    if backend == "postgres":
        _postgres.check()
        db = _postgres.fresh_url()
        try:
            run_suite(db)
        finally:
            _postgres.drop_schema_sync(db)
        return
    run_suite("memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'streams.db'}")


def run_suite(db: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tests.conformance.run", "--db", db],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    lines = completed.stdout.strip().splitlines()
    failures = "\n".join(line for line in lines if line.startswith("FAILED"))
    assert lines, completed.stderr[-2000:]
    assert lines[-1] == f"{SUITE_TESTS} passed, 0 failed", failures or completed.stderr[-2000:]
    assert completed.returncode == 0
