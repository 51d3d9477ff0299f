"""``entities check APP --db URL``: the pre-deploy gate (see :mod:`entities._check`).

Findings go to stdout, one line each (or one JSON document with ``-o json``); progress over a
large store goes to stderr. Exit status 0 when nothing stops the deploy, 1 on any finding, 2 for
a mistake in the command line (one line, never a traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from .._check import CheckReport, check_deploy
from .._registry import Registry
from .._runtime import Runtime
from ._app import load_registry
from ._common import dumps, output_option
from ._db import UsageProblem, db_option, open_db, probe_postgres, require_db

__all__ = ["check"]

PROGRESS_FROM = 200  # entities: a smaller store is read before a bar would be worth showing


def _registry(app: str) -> Registry:
    """The registry of APP, with a mistake told in one line.

    Raises:
        UsageProblem: APP cannot be loaded (no module, no file, no registry, an import error).
    """
    try:
        registry = load_registry(app)
    except click.BadParameter as exc:
        raise UsageProblem(f"APP {app!r}: {exc.message}") from None
    except Exception as exc:  # the user's module failed while importing
        raise UsageProblem(f"APP {app!r} failed to import: {type(exc).__name__}: {exc}") from None
    registry.source = None  # check writes nothing, not even where the code was loaded from
    return registry


@contextmanager
def _progress() -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a bar on stderr once the store is large."""
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("checking entities"), BarColumn(), MofNCompleteColumn(),
        console=console, transient=True,
    )  # fmt: skip
    task = None

    def tell(done: int, total: int) -> None:
        nonlocal task
        if total < PROGRESS_FROM or not console.is_terminal:
            return
        if task is None:
            bar.start()
            task = bar.add_task("check", total=total)
        bar.update(task, completed=done)

    try:
        yield tell
    finally:
        if task is not None:
            bar.stop()


@click.command()
@click.argument("app")
@db_option
@click.option(
    "--replay-last",
    "replay_last",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Replay the last N recorded wakes of each type against the new code (0: none).",
)
@output_option
def check(app: str, db: str, replay_last: int, output: str) -> None:
    """Check the data stored in --db against the code in APP before deploying it.

    Reports, one line each: types with live entities that APP lacks, state rows and queued
    inbox messages that no longer validate (after migrations), and divergences when the last
    wakes of each type are replayed against APP. Exit status 1 on any finding, 0 otherwise.
    Reads the store only."""
    registry = _registry(app)
    require_db(db)
    probe_postgres(db)

    async def main() -> CheckReport:
        with _progress() as tell:
            async with open_db(db, read_only=True) as store, Runtime(registry, store) as rt:
                return await check_deploy(rt, replay_last=replay_last, progress=tell)

    report = anyio.run(main)
    if output == "json":
        click.echo(dumps(report.to_json()))
    else:
        for finding in report.findings:
            click.echo(finding.message)
        click.echo(report.summary())
    sys.exit(0 if report.ok else 1)
