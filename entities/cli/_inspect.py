"""``entities inspect URL``: a readable summary of an entity (``--output json``: everything)."""

from __future__ import annotations

import datetime
from typing import Any

import click
import orjson

from ._client import Client
from ._client_cmds import client_options
from ._common import dumps, output_option, path_of

__all__ = ["at", "inspect", "schedule_line", "summary"]


def at(timestamp: float | None) -> str:
    """An epoch time as ISO 8601 UTC (``-`` for none)."""
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def schedule_line(entry: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """A schedule (manifest entry) as ``(id, kind, status, when, what)``."""
    status = entry.get("status") or "-"
    if entry.get("schedule_type") == "cron":
        when = f"next {at(entry.get('fire_at'))}" if status == "active" else "-"
        what = f"{entry.get('expression')} ({entry.get('timezone') or 'UTC'})"
        kind = "cron"
    else:
        sent = entry.get("sent_at")
        when = f"sent {at(sent)}" if sent else f"at {at(entry.get('fire_at'))}"
        what = f"send to {entry.get('target_url') or '?'}"
        kind = "send"
    if entry.get("payload") is not None:
        payload = dumps(entry["payload"])
        what += f" {payload if len(payload) <= 60 else payload[:57] + '...'}"
    if entry.get("reason"):
        what += f" ({entry['reason']})"
    return entry.get("id", "?"), kind, status, when, what


def _latest_error(runs: list[dict[str, Any]]) -> str | None:
    for run in reversed(runs):
        if run.get("error"):
            return f"{run['error']} (wake {run.get('wake_id')}, {run.get('status')})"
    return None


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def summary(data: dict[str, Any]) -> list[str]:
    """The lines ``inspect`` prints for the JSON the server answered ``GET
    /_entities/entities/{type}/{id}`` with."""
    url = data["url"]
    tags = data.get("tags") or {}
    runs: list[dict[str, Any]] = data.get("recent_runs") or []
    queue = data.get("queue", 0)
    fields: list[tuple[str, str]] = [
        ("status", data["status"] + (f", {queue} waiting" if data.get("pending") else "")),
        ("parent", data.get("parent") or "-"),
        ("created", data.get("created_at") or "-"),
        ("last active", data.get("last_active") or "-"),
        ("runs", str(data.get("runs", 0))),
        ("tags", ", ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"),
    ]
    if runs:
        last = runs[-1]
        took = last.get("duration_ms")
        duration = f", {took:g} ms" if isinstance(took, int | float) else ""
        fields.append(("last run", f"{last.get('wake_id')} {last.get('status')}{duration}"))
    dead = data.get("dead_letters", 0)
    fields.append(("dead letters", f"{dead} (entities dead-letters --url {url})" if dead else "0"))
    error = _latest_error(runs)
    if error:
        fields.append(("latest error", error))
    state = data.get("state") or {}
    if state:
        fields.append(("state", ", ".join(f"{k} ({_rows(len(v))})" for k, v in state.items())))
    lines = [f"{url}  ({data.get('type', '?')})"]
    lines += [f"  {name:<13}{value}" for name, value in fields]
    manifest = list((data.get("manifest") or {}).values())
    children = [e for e in manifest if e.get("kind") == "child"]
    schedules = [e for e in manifest if e.get("kind") == "schedule"]
    sources = [e for e in manifest if e.get("kind") == "source"]
    if children:
        lines.append(f"  children ({len(children)})")
        lines += [f"    {c.get('entity_url')}" for c in children]
    if schedules:
        lines.append(f"  schedules ({len(schedules)})")
        for entry in schedules:
            id_, kind, status, when, what = schedule_line(entry)
            lines.append(f"    {id_:<20} {kind:<5} {status:<9} {when:<30} {what}")
    if sources:
        lines.append(f"  observes ({len(sources)})")
        lines += [f"    {s.get('source_type')} {s.get('source_ref')}" for s in sources]
    lines.append(f"(all of it, state and manifest included: entities inspect {url} --output json)")
    return lines


@click.command()
@click.argument("url")
@client_options
@output_option
def inspect(url: str, server: str, token: str | None, output: str) -> None:
    """Summarise an entity: status, runs, tags, children, schedules, dead letters, latest
    error (--output json: everything, state and manifest included)."""
    data = Client(server, token).request("GET", f"/_entities/entities{path_of(url)}")
    if output == "json":
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    for line in summary(data):
        click.echo(line)
