"""Helpers for tests that run real servers and real ``entities`` processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def entities_command() -> list[str]:
    """The installed ``entities`` console script (next to this Python), else ``python -m``."""
    script = Path(sys.executable).with_name("entities")
    if script.exists():
        return [str(script)]
    found = shutil.which("entities")
    if found:
        return [found]
    return [sys.executable, "-m", "entities.cli"]


def cli_env() -> dict[str, str]:
    """The environment for CLI subprocesses: the repo importable, no inherited entities settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITIES_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EntitiesProcess:
    """One ``entities serve``/``entities worker`` subprocess; ``stop()`` always reaps it."""

    def __init__(self, args: Sequence[str], *, log: Path, port: int | None = None) -> None:
        self.args = [*entities_command(), *args]
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 20.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT
            )
        if self.port is None:
            return
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not listen within {timeout} s:\n{self.output()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
