#!/usr/bin/env python3
"""A tiny agent CLI speaking the agentproc protocol, wire 0.1, with no dependencies.

It reads its turn from the ``AGENT_*`` environment variables and writes protocol lines to stdout:
a few ``AGENT_PARTIAL:`` chunks (JSON strings) while it "thinks", ``AGENT_SESSION:`` with the
session id to keep, then the reply body. A new session gets a fresh id; a known one is
continued. ``fail`` shows the error channel (``AGENT_ERROR:`` and exit 1).

Try it alone: ``AGENT_MESSAGE=hello python3 examples/cli_agent/agent.py``
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    message = os.environ.get("AGENT_MESSAGE", "")
    session = os.environ.get("AGENT_SESSION_ID", "")
    if message.strip().lower() == "fail":
        emit("AGENT_ERROR:" + json.dumps("I was asked to fail."))
        return 1
    for chunk in ("thinking", "...", " done\n"):
        emit("AGENT_PARTIAL:" + json.dumps(chunk))
        time.sleep(0.1)
    if session:
        note = f"(continuing session {session})"
    else:
        session = f"s-{uuid.uuid4().hex[:8]}"
        note = f"(new session {session})"
    emit(f"AGENT_SESSION:{session}")
    emit(f"You said: {message}")
    emit(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
