"""``python -m streams serve``: a real process over SQLite; it stops cleanly and keeps data."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(db: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streams", "serve", "--db", db, "--port", str(port),
         "--long-poll-ms", "200", "--log-level", "info"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def wait_up(client: httpx2.Client, url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else b""
        try:
            client.get(url)
            return
        except httpx2.TransportError:
            time.sleep(0.05)
    raise AssertionError("the server did not start")


def test_serve_stops_on_sigterm_and_keeps_data(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'data' / 'streams.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/stream/cli/a"
    with httpx2.Client(timeout=10) as client:
        for round_number in range(2):
            process = start(db, port)
            try:
                wait_up(client, url, process)
                if round_number == 0:
                    created = client.put(
                        url, content=b"kept", headers={"Content-Type": "text/plain"}
                    )
                    assert created.status_code == 201
                    poll = client.get(url, params={"offset": "now", "live": "long-poll"})
                    assert poll.status_code == 204  # --long-poll-ms 200 took effect
                else:
                    assert client.get(url).content == b"kept"
            finally:
                process.send_signal(signal.SIGTERM)
                output = process.communicate(timeout=15)[0].decode()
            # uvicorn shuts down gracefully, then re-raises the signal it caught
            assert process.returncode in (0, -signal.SIGTERM), output
            assert "Application shutdown complete" in output
            assert "Traceback" not in output


def test_serve_rejects_bad_options() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "streams", "serve", "--port", "99999"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert "99999" in completed.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "streams", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--long-poll-ms" in shown.stdout and "sqlite:///.entities/entities.db" in shown.stdout
