"""Run the official Durable Streams conformance suite against our server.

    python -m tests.conformance.run [--db URL] [-- extra vitest args]

Starts ``python -m streams serve --allow-loopback-webhooks`` (the suite's webhook receivers
listen on 127.0.0.1; it checks that private addresses are refused) on 127.0.0.1 (a free port)
over a fresh SQLite file (or the given store URL), installs the pinned npm suite when
``node_modules`` is missing or older than ``package-lock.json``, runs ``npx vitest run`` with
the JSON reporter, lists the failures, and prints as its last line ``N passed, M failed``.
Exits non-zero unless every test passed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LONG_POLL_MS = 500
SSE_MAX_S = 60


def say(line: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server did not listen on port {port} within {timeout} s")


def ensure_node_modules() -> None:
    """``npm ci`` when node_modules is missing or older than the lockfile."""
    marker = HERE / "node_modules" / ".package-lock.json"
    lock = HERE / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return
    say("installing the conformance suite (npm ci)...", err=True)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True
    )


def summarize(report: dict[str, Any]) -> tuple[int, int, list[str]]:
    passed = failed = 0
    failures: list[str] = []
    for suite in report.get("testResults", []):
        for test in suite.get("assertionResults", []):
            if test.get("status") == "passed":
                passed += 1
            elif test.get("status") == "failed":
                failed += 1
                message = " ".join(test.get("failureMessages", []))[:300].replace("\n", " ")
                failures.append(f"{test.get('fullName')}: {message}")
        if suite.get("status") == "failed" and not suite.get("assertionResults"):
            failed += 1
            failures.append(f"{suite.get('name')}: {suite.get('message', '')[:300]}")
    return passed, failed, failures


def run(db: str | None, vitest_args: list[str]) -> tuple[int, int]:
    ensure_node_modules()
    with tempfile.TemporaryDirectory(prefix="ds-conformance-") as tmp:
        url = db or f"sqlite:///{Path(tmp) / 'streams.db'}"
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "streams", "serve", "--db", url, "--host", "127.0.0.1",
             "--port", str(port), "--long-poll-ms", str(LONG_POLL_MS),
             "--sse-max-s", str(SSE_MAX_S), "--log-level", "warning",
             "--allow-loopback-webhooks"],  # the suite's webhook receivers are on 127.0.0.1
            cwd=ROOT,
        )  # fmt: skip
        try:
            wait_for_port(port, server)
            report_path = Path(tmp) / "report.json"
            env = {
                **os.environ,
                "CONFORMANCE_TEST_URL": f"http://127.0.0.1:{port}",
                "CONFORMANCE_LONG_POLL_MS": str(LONG_POLL_MS),
            }
            started = time.monotonic()
            subprocess.run(
                ["npx", "vitest", "run", "conformance.test.mjs", "--reporter=dot",
                 "--reporter=json", f"--outputFile.json={report_path}", *vitest_args],
                cwd=HERE, env=env, check=False,
            )  # fmt: skip
            elapsed = time.monotonic() - started
            if not report_path.exists():
                raise RuntimeError("vitest wrote no JSON report")
            passed, failed, failures = summarize(json.loads(report_path.read_text()))
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    for failure in failures:
        say(f"FAILED {failure}")
    say(f"store {url.split(':', 1)[0]}: suite took {elapsed:.1f} s")
    return passed, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db", help="store URL (default: a fresh SQLite file)")
    parser.add_argument("vitest_args", nargs="*", help="extra arguments for vitest (after --)")
    args = parser.parse_args(argv)
    try:
        passed, failed = run(args.db, args.vitest_args)
    except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError) as exc:
        say(f"conformance run failed: {exc}")
        say("0 passed, 1 failed")
        return 1
    say(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
