"""Run ``agentproc.runner.run`` (the SDK's reference bridge) inside an agentproc venv and print
its RunResult as one JSON line. Input: one JSON object on stdin with ``profile``, ``message`` and
optional ``session_id``, ``streaming``, ``attachments``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from agentproc import runner  # type: ignore[import-not-found]


def main() -> None:
    request = json.loads(sys.stdin.read())
    partials: list[str] = []
    fields = {f.name for f in dataclasses.fields(runner.RunOptions)}
    options: dict[str, Any] = {
        "message": request["message"],
        "session_id": request.get("session_id", ""),
        "streaming": request.get("streaming"),
        "on_partial": lambda text: partials.append(text),
    }
    if "attachments" in fields and request.get("attachments"):
        options["attachments"] = request["attachments"]
    result = runner.run(request["profile"], runner.RunOptions(**options))
    out = {
        "reply": result.reply,
        "session_id": result.session_id,
        "error": result.error,
        "exit_code": result.exit_code,
        "timed_out": result.timed_out,
        "partials": partials,
    }
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
