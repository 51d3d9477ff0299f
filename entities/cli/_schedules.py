"""``entities schedules URL``: list an entity's schedules, set a cron schedule, cancel one."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from ._client import Client
from ._client_cmds import client_options
from ._common import dumps, output_option, parse_json, path_of
from ._inspect import schedule_line

__all__ = ["schedules"]


@click.command()
@click.argument("url")
@client_options
@click.option("--set", "set_id", default=None, metavar="ID", help="Create or replace cron ID.")
@click.option("--cron", "expression", default=None, help="Its cron expression (with --set).")
@click.option("--timezone", default=None, help="Its time zone (with --set; default UTC).")
@click.option(
    "--payload", "payload_json", default=None, help="JSON delivered with each tick (with --set)."
)
@click.option(
    "--cancel",
    "cancel_id",
    default=None,
    metavar="ID",
    help="Cancel cron ID, or the pending delayed send ID.",
)
@output_option
def schedules(
    url: str,
    server: str,
    token: str | None,
    set_id: str | None,
    expression: str | None,
    timezone: str | None,
    payload_json: str | None,
    cancel_id: str | None,
    output: str,
) -> None:
    """List URL's schedules (cron and delayed sends); or set one with --set ID --cron EXPR, or
    cancel one with --cancel ID.

    \b
    entities schedules /report/r1
    entities schedules /report/r1 --set daily --cron '0 9 * * *' --timezone Europe/Paris
    entities schedules /report/r1 --cancel daily
    """
    _check(set_id, expression, timezone, payload_json, cancel_id)
    client = Client(server, token)
    base = f"/_entities/entities{path_of(url)}/schedules"
    if set_id is not None and expression is not None:
        body: dict[str, Any] = {"expression": expression}
        if timezone is not None:
            body["timezone"] = timezone
        if payload_json is not None:
            body["payload"] = parse_json(payload_json, "--payload")
        name = set_id.removeprefix("cron:")
        entry = client.request("PUT", f"{base}/{quote(name, safe=':')}", body)
        _show([entry], output, single=True)
    elif cancel_id is not None:
        done = client.request("DELETE", f"{base}/{quote(cancel_id, safe=':')}")
        click.echo(dumps(done) if output == "json" else f"cancelled {done['cancelled']}")
    else:
        _show(client.request("GET", base), output)


def _check(
    set_id: str | None,
    expression: str | None,
    timezone: str | None,
    payload_json: str | None,
    cancel_id: str | None,
) -> None:
    """Raises click.UsageError for options that do not go together."""
    if set_id is not None and cancel_id is not None:
        raise click.UsageError("--set and --cancel do not go together")
    if (set_id is None) != (expression is None):
        raise click.UsageError("--set ID needs --cron EXPR, and --cron goes with --set")
    if set_id is None and (timezone is not None or payload_json is not None):
        raise click.UsageError("--timezone and --payload go with --set")


def _show(entries: list[dict[str, Any]], output: str, *, single: bool = False) -> None:
    if output == "json":
        click.echo(dumps(entries[0] if single else entries))
        return
    if not entries:
        click.echo("no schedules")
        return
    click.echo(f"{'ID':<24} {'KIND':<5} {'STATUS':<9} {'WHEN':<30} WHAT")
    for entry in entries:
        id_, kind, status, when, what = schedule_line(entry)
        click.echo(f"{id_:<24} {kind:<5} {status:<9} {when:<30} {what}")
