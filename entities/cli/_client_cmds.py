"""Client commands, over HTTP to ``entities serve`` (``--server``, ``--token``): ``spawn``,
``send``, ``view``, ``observe``, ``ps``, ``workers``, ``dead-letters``, ``retry``, ``discard``,
``kill``, ``delete``, ``types``."""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from typing import Any, TypeVar, get_args

import click

from .._records import EntityRecord
from ._client import Client
from ._common import (
    dumps,
    idempotency_option,
    message_json_option,
    message_of,
    old_json_flag,
    output_option,
    parse_json,
    path_of,
    report,
    server_option,
    token_option,
)
from ._db import UsageProblem

__all__ = [
    "STATUSES",
    "client_options",
    "dead_letters",
    "delete",
    "discard",
    "kill",
    "observe",
    "ps",
    "retry",
    "send",
    "spawn",
    "types",
    "view",
    "workers",
]

F = TypeVar("F", bound=Callable[..., Any])

# what ``ps --status`` may ask for: the record's statuses, ``paused``, ``failed`` (idle with
# dead letters) and ``orphaned`` (of a type the server's code lacks)
STATUSES = (
    *get_args(EntityRecord.model_fields["status"].annotation),
    "paused",
    "failed",
    "orphaned",
)


def client_options(fn: F) -> F:
    """``--server`` and ``--token``."""
    return server_option(token_option(fn))


def _tags(tags: tuple[str, ...]) -> dict[str, str]:
    malformed = [t for t in tags if "=" not in t or not t.split("=", 1)[0]]
    if malformed:
        raise click.BadParameter(f"expected key=value, got {malformed[0]!r}", param_hint="--tag")
    return dict(t.split("=", 1) for t in tags)


@click.command()
@click.argument("url")
@client_options
@click.option("--args", "args_json", default=None, help="Spawn args as JSON.")
@click.option("--tag", "tags", multiple=True, help="key=value (repeatable).")
@idempotency_option
@output_option
@old_json_flag
def spawn(
    url: str,
    server: str,
    token: str | None,
    args_json: str | None,
    tags: tuple[str, ...],
    idempotency_key: str | None,
    output: str,
) -> None:
    """Create the entity at URL (/type/id)."""
    body: dict[str, Any] = {"args": parse_json(args_json, "--args") if args_json else None}
    body["tags"] = _tags(tags)
    info = Client(server, token).request(
        "PUT", f"/_entities/entities{path_of(url)}", body, idempotency_key=idempotency_key
    )
    click.echo(dumps(info) if output == "json" else f"spawned {info['url']}")


@click.command()
@click.argument("url")
@click.argument("message")
@client_options
@click.option("--type", "message_type", default=None, help="Message type.")
@click.option(
    "--wait",
    "wait_s",
    default=0.0,
    type=float,
    help="Wait up to this many seconds for the reply and print it. Exit status: 0 replied, "
    "1 the wake was given up (its error is printed), 2 refused, 3 no answer in time.",
)
@click.option(
    "--mode",
    type=click.Choice(["queued", "steer", "interrupt"]),
    default="queued",
    show_default=True,
    help="queued: for the next wake; steer: handed to an agent run that is going, before its "
    "next model round (else queued); interrupt: interrupt the running wake, then deliver.",
)
@click.option(
    "--attach",
    "attach",
    multiple=True,
    metavar="TYPE=URL",
    help="Attach a file by reference (repeatable): TYPE is image, file, audio or video; URL "
    "an http(s): or data: URL, or stream:/PATH for a stream uploaded to the server.",
)
@idempotency_option
@message_json_option
@output_option
def send(
    url: str,
    message: str,
    server: str,
    token: str | None,
    message_type: str | None,
    wait_s: float,
    mode: str,
    attach: tuple[str, ...],
    idempotency_key: str | None,
    message_is_json: bool,
    output: str,
) -> None:
    """Send MESSAGE to URL (text, sent as {"text": ...}, unless --json).

    Prints the receipt; with --wait, the replies (--output json: one object {url, key,
    replies, status, error})."""
    client = Client(server, token, timeout=max(30.0, wait_s + 10))
    payload = message_of(message, message_is_json)
    if wait_s > 0:  # one request: send and wait for the answer (POST …/call)
        answer = client.call(
            path_of(url), payload, wait_ms=min(int(wait_s * 1000), 120_000),
            message_type=message_type, mode=mode, idempotency_key=idempotency_key,
            attachments=[_attachment(a) for a in attach] or None,
        )  # fmt: skip
        extra = {"url": answer["url"], "key": answer["key"]}
        status, error = answer.get("status"), answer.get("error")
        sys.exit(report(answer["replies"], status, error, wait_s, output, extra))
    receipt = client.request(
        "POST",
        f"/_entities/entities{path_of(url)}/send",
        {"payload": payload, "type": message_type}
        | ({} if mode == "queued" else {"mode": mode})
        | ({"attachments": [_attachment(a) for a in attach]} if attach else {}),
        idempotency_key=idempotency_key,
    )
    text = f"sent {receipt['key']} to {receipt['url']}"
    click.echo(dumps(receipt) if output == "json" else text)


def _attachment(option: str) -> dict[str, str]:
    """An ``--attach TYPE=URL`` option as an attachment (the server validates the rest)."""
    kind, sep, where = option.partition("=")
    if not sep or not kind or not where:
        raise click.BadParameter(f"use TYPE=URL, got {option!r}", param_hint="--attach")
    if where.startswith("stream:"):
        return {"type": kind, "stream": where.removeprefix("stream:")}
    return {"type": kind, "url": where}


def _describe(item: dict[str, Any]) -> str:
    operation = item.get("headers", {}).get("operation", "?")
    text = dumps(item.get("value"))
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{item.get('type', '?'):<16} {operation:<7} {item.get('key', ''):<24} {text}"


@click.command()
@click.argument("url")
@client_options
@click.option("--from", "offset", default="-1", show_default=True, help="Start offset.")
@click.option("--last", type=click.IntRange(min=0), default=None, help="Only the last N events.")
@output_option
@old_json_flag
def view(
    url: str, server: str, token: str | None, offset: str, last: int | None, output: str
) -> None:
    """Print an entity's stream once (--output json: one event per line)."""
    client = Client(server, token)
    if last is not None:
        offset = client.offset_before_tail(path_of(url), last)
    for item, _ in client.stream_events(path_of(url), offset, live=False):
        click.echo(dumps(item) if output == "json" else _describe(item))


@click.command()
@click.argument("url")
@client_options
@click.option("--from", "offset", default="-1", show_default=True, help="Start offset.")
@click.option("--last", type=click.IntRange(min=0), default=None, help="Start N events back.")
@output_option
@old_json_flag
def observe(
    url: str, server: str, token: str | None, offset: str, last: int | None, output: str
) -> None:
    """Tail an entity's stream live, until Ctrl-C (--output json: one event per line)."""
    client = Client(server, token)
    if last is not None:
        offset = client.offset_before_tail(path_of(url), last)
    try:
        for item, _ in client.stream_events(path_of(url), offset, live=True):
            click.echo(dumps(item) if output == "json" else _describe(item))
    except KeyboardInterrupt:
        pass


@click.command()
@client_options
@click.option("--type", "type_", default=None, help="Only entities of this type.")
@click.option(
    "--status",
    default=None,
    type=click.Choice(STATUSES),
    help="Only entities in this status (failed: idle with dead letters; orphaned: of a type "
    "the server's code lacks).",
)
@click.option("--tag", default=None, help="Only entities with this tag: key or key=value.")
@click.option("--parent", default=None, help="Only the children of this entity URL.")
@output_option
@old_json_flag
def ps(
    server: str,
    token: str | None,
    type_: str | None,
    status: str | None,
    tag: str | None,
    parent: str | None,
    output: str,
) -> None:
    """List entities."""
    items = Client(server, token).request(
        "GET", "/_entities/entities", type=type_, status=status, tag=tag, parent=parent
    )
    if output == "json":
        click.echo(dumps(items))
        return
    click.echo(f"{'URL':<40} {'STATUS':<8} {'RUNS':>5} {'QUEUE':>5} {'CREATED':<25} LAST ACTIVE")
    for e in items:
        click.echo(
            f"{e['url']:<40} {e['status']:<8} {e['runs']:>5} {e.get('queue', 0):>5} "
            f"{e['created_at']:<25} {e['last_active'] or ''}"
        )


@click.command()
@client_options
@output_option
@old_json_flag
def workers(server: str, token: str | None, output: str) -> None:
    """List the workers sharing the server's store (live: renewed in the last few seconds)."""
    items = Client(server, token).request("GET", "/_entities/workers")
    if output == "json":
        click.echo(dumps(items))
        return
    click.echo(
        f"{'WORKER':<24} {'LIVE':<5} {'HOST':<24} {'PID':>8}  {'LAPSES AT':<32} "
        f"{'VERSION':<12} TYPES"
    )
    for w in items:
        lapses = datetime.datetime.fromtimestamp(w["expires"], datetime.UTC).isoformat()
        live = "yes" if w["live"] else "no"
        version = w.get("deploy_version") or "-"
        served = w.get("types")
        names = "(all)" if served is None else ",".join(served) or "(none)"
        click.echo(
            f"{w['id']:<24} {live:<5} {w['host']:<24} {w['pid']:>8}  {lapses:<32} "
            f"{version:<12} {names}"
        )


@click.command("dead-letters")
@client_options
@click.option("--type", "type_", default=None, help="Only this entity type's.")
@click.option("--url", default=None, help="Only this entity's.")
@output_option
@old_json_flag
def dead_letters(
    server: str, token: str | None, type_: str | None, url: str | None, output: str
) -> None:
    """List wakes given up after their last attempt (retry them with `entities retry ID`)."""
    items = Client(server, token).request("GET", "/_entities/dead-letters", type=type_, url=url)
    if output == "json":
        click.echo(dumps(items))
        return
    click.echo(f"{'ID':<40} {'ATTEMPTS':>8} {'MESSAGES':>8}  {'TIME':<25} ERROR")
    for d in items:
        error = d["error"] if len(d["error"]) <= 60 else d["error"][:57] + "..."
        click.echo(f"{d['id']:<40} {d['attempts']:>8} {d['messages']:>8}  {d['time']:<25} {error}")


@click.command()
@click.argument("id")
@client_options
@output_option
def retry(id: str, server: str, token: str | None, output: str) -> None:
    """Deliver the messages of dead letter ID again, as a new wake."""
    done = Client(server, token).request("POST", f"/_entities/dead-letters/{id}/retry")
    click.echo(dumps(done) if output == "json" else f"retried {done['retried']} ({done['url']})")


@click.command()
@click.argument("id")
@client_options
@output_option
def discard(id: str, server: str, token: str | None, output: str) -> None:
    """Drop dead letter ID for good."""
    done = Client(server, token).request("DELETE", f"/_entities/dead-letters/{id}")
    click.echo(dumps(done) if output == "json" else f"discarded {done['discarded']}")


@click.command()
@click.argument("url")
@client_options
@output_option
def kill(url: str, server: str, token: str | None, output: str) -> None:
    """Stop an entity for good."""
    info = Client(server, token).request("DELETE", f"/_entities/entities{path_of(url)}")
    click.echo(dumps(info) if output == "json" else f"{info['url']} {info['status']}")


def _decide(decision: str) -> click.Command:
    verb = "Approve" if decision == "approve" else "Deny"

    @click.command(decision)
    @click.argument("url")
    @click.argument("id")
    @click.option("--note", default=None, help="Why (the model reads it after a denial).")
    @client_options
    @output_option
    def command(
        url: str, id: str, note: str | None, server: str, token: str | None, output: str
    ) -> None:
        body: dict[str, Any] = {"decision": decision}
        if note is not None:
            body["note"] = note
        found = Client(server, token).request(
            "POST", f"/_entities/entities{path_of(url)}/approvals/{id}", body
        )
        click.echo(dumps(found) if output == "json" else f"{found['id']} {found['status']}")

    command.help = f"{verb} the pending approval ID of URL's agent: the suspended run goes on " + (
        "(the tool runs)." if decision == "approve" else "(the model is told: not approved)."
    )
    return command


approve = _decide("approve")
deny = _decide("deny")


@click.command()
@click.argument("url")
@client_options
@output_option
def approvals(url: str, server: str, token: str | None, output: str) -> None:
    """List the approvals URL's agent runs asked for (pending first)."""
    found = Client(server, token).request("GET", f"/_entities/entities{path_of(url)}/approvals")
    if output == "json":
        click.echo(dumps(found))
        return
    found.sort(key=lambda a: a["status"] != "pending")
    for a in found:
        click.echo(f"{a['id']:<40} {a['status']:<9} {a['tool']} {dumps(a['arguments'])}")


@click.command()
@click.argument("url")
@click.argument("signal", type=click.Choice(["pause", "resume", "interrupt"]))
@click.option("--reason", default=None, help="Why (recorded with the signal).")
@client_options
@output_option
def signal(
    url: str, signal: str, reason: str | None, server: str, token: str | None, output: str
) -> None:
    """Pause, resume or interrupt an entity: pause lets no new wake start (a running one
    finishes; messages queue), resume runs what queued, interrupt cancels the running wake
    (its run ends interrupted) and starts the next."""
    body: dict[str, Any] = {"signal": signal}
    if reason is not None:
        body["reason"] = reason
    info = Client(server, token).request("POST", f"/_entities/entities{path_of(url)}/signal", body)
    click.echo(dumps(info) if output == "json" else f"{info['url']} {info['status']}")


@click.command()
@click.argument("url")
@click.argument("new_id")
@click.option(
    "--at",
    default=None,
    metavar="OFFSET",
    help="Share history up to this offset of URL's stream, or 'latest_completed_run' "
    "(default: everything URL has processed).",
)
@client_options
@output_option
def fork(
    url: str, new_id: str, at: str | None, server: str, token: str | None, output: str
) -> None:
    """Create /TYPE/NEW_ID sharing URL's history up to a point, then living on its own."""
    body: dict[str, Any] = {"id": new_id} if at is None else {"id": new_id, "at": at}
    info = Client(server, token).request("POST", f"/_entities/entities{path_of(url)}/fork", body)
    click.echo(dumps(info) if output == "json" else f"{info['url']} forked from {path_of(url)}")


@click.command()
@click.argument("url")
@client_options
@click.option(
    "--purge",
    is_flag=True,
    help="Required: delete the entity for good (its stream and every row about it).",
)
@click.option("--recursive", is_flag=True, help="Its descendants too (else they are kept).")
@output_option
def delete(
    url: str, server: str, token: str | None, purge: bool, recursive: bool, output: str
) -> None:
    """Delete an entity for good: its stream, state, schedules, dead letters, idempotency keys
    and subscriptions; the URL is then free to spawn again. Needs --purge (a kill stops an
    entity and keeps its history: `entities kill URL`)."""
    if not purge:
        raise UsageProblem(
            f"delete erases {url} and its history for good: say so with --purge "
            "(to stop it and keep its data: entities kill URL)"
        )
    done = Client(server, token).request(
        "DELETE",
        f"/_entities/entities{path_of(url)}",
        purge="true",
        recursive="true" if recursive else None,
    )
    click.echo(
        dumps(done) if output == "json" else "\n".join(f"purged {u}" for u in done["purged"])
    )


@click.command()
@client_options
@output_option
@old_json_flag
def types(server: str, token: str | None, output: str) -> None:
    """List the server's entity types."""
    items = Client(server, token).request("GET", "/_entities/types")
    if output == "json":
        click.echo(dumps(items))
        return
    for t in items:
        click.echo(f"{t['name']:<20} {t['description']}")
