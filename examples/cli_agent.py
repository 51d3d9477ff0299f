"""Any agent CLI as a durable entity: ``examples/cli_agent/agent.py`` (an agentproc wire-0.1
program) runs once per message. Its partials stream into the entity's ``text_deltas`` (and to
the terminal), its reply is the entity's reply, and its session id is kept in the entity's
state and handed back on the next message. ``fail`` shows an agent error.

    entities run examples/cli_agent.py:registry /cli/c1 "hello"
    entities run examples/cli_agent.py:registry /cli/c1 "again"
"""

from __future__ import annotations

import sys
from pathlib import Path

from entities import Registry

AGENT = Path(__file__).resolve().parent / "cli_agent" / "agent.py"

registry = Registry()
registry.define_process(
    "cli",
    command=[sys.executable, str(AGENT)],
    description="An agentproc CLI agent run once per message",
    timeout_s=30,
)
