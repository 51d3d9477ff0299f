"""The ``entities`` command group. Server-side commands (they open ``--db`` themselves):
``serve``, ``worker``, ``run``, ``replay``, ``check``. Client-side commands (over HTTP to
``--server``): ``spawn``, ``send``, ``view``, ``observe``, ``ps``, ``inspect``, ``schedules``,
``kill``, ``delete``, ``fork``, ``signal``, ``approvals``, ``approve``, ``deny``, ``types``,
``workers``, ``dead-letters``, ``retry``, ``discard``, ``compact``."""

from __future__ import annotations

import os

import click

from ._check import check
from ._client_cmds import (
    approvals,
    approve,
    dead_letters,
    delete,
    deny,
    discard,
    fork,
    kill,
    observe,
    ps,
    retry,
    send,
    signal,
    spawn,
    types,
    view,
    workers,
)
from ._compact import compact
from ._inspect import inspect
from ._logs import setup_logging
from ._schedules import schedules
from ._server_cmds import replay, run, serve, worker

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="More log output: -v one line per wake and other INFO, -vv debug, -vvv debug from "
    "libraries too (asyncio, uvicorn, asyncpg, httpx...).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=lambda: os.environ.get("ENTITIES_LOG_FORMAT", "text"),
    show_default="text",
    help="Log lines on stderr as text, or as one JSON object each (time, level, logger, "
    "message and the record's fields) (env ENTITIES_LOG_FORMAT).",
)
@click.version_option(package_name="entities-runtime")
def cli(verbose: int, log_format: str) -> None:
    """A durable entity runtime over event streams.

    Options before the command apply to every command: entities -v --log-format json serve APP.
    """
    setup_logging(verbose, log_format)


for command in (
    serve,
    worker,
    run,
    replay,
    check,
    spawn,
    send,
    view,
    observe,
    ps,
    inspect,
    schedules,
    kill,
    delete,
    fork,
    signal,
    approvals,
    approve,
    deny,
    types,
    workers,
    dead_letters,
    retry,
    discard,
    compact,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli()
