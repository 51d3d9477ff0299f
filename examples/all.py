"""Every example type in one registry (what ``make run`` serves)."""

from __future__ import annotations

from entities import Registry
from examples import approval, assistant, chat, cli_agent, counter, fanout

registry = Registry()
for _module in (counter, chat, fanout, assistant, cli_agent, approval):
    registry.include(_module.registry)
