"""What the ``entities`` commands share: options, JSON helpers, exit codes, reply reports."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click
import orjson

from .._runtime import DEFAULT_WAKE_TIMEOUT

__all__ = [
    "DEFAULT_SERVER",
    "EXIT_COMPLETED",
    "EXIT_FAILED",
    "EXIT_NO_ANSWER",
    "EXIT_USAGE",
    "compact_every_option",
    "dumps",
    "idempotency_option",
    "lease_option",
    "message_json_option",
    "message_of",
    "old_json_flag",
    "output_option",
    "parse_json",
    "path_of",
    "report",
    "server_option",
    "token_option",
    "wake_timeout_option",
]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_SERVER = "http://127.0.0.1:4437"

# exit codes of ``send --wait`` and ``run``
EXIT_COMPLETED, EXIT_FAILED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3

server_option = click.option(
    "--server",
    default=lambda: os.environ.get("ENTITIES_URL", DEFAULT_SERVER),
    show_default=DEFAULT_SERVER,
    help="Server URL (env ENTITIES_URL).",
)
token_option = click.option(
    "--token",
    envvar="ENTITIES_TOKEN",
    default=None,
    help="Bearer token, for a server started with --token (env ENTITIES_TOKEN).",
)
message_json_option = click.option(
    "--json",
    "message_is_json",
    is_flag=True,
    help='MESSAGE is JSON (else it is text, sent as {"text": MESSAGE}).',
)
lease_option = click.option(
    "--lease-seconds",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Wake lease: how soon another worker redelivers the wake of a crashed one.",
)
wake_timeout_option = click.option(
    "--wake-timeout",
    default=DEFAULT_WAKE_TIMEOUT,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a wake may run (unless its type sets wake_timeout); past it the handler is "
    "cancelled and the attempt fails.",
)
compact_every_option = click.option(
    "--compact-every",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between the worker's compaction rounds (what each type's retention lets go); "
    "0: never.",
)
idempotency_option = click.option(
    "--idempotency-key",
    default=None,
    help="Apply this request once: sent again with the same key (within a day), it changes "
    "nothing and gets the first answer; a failed connection is retried.",
)


def _old_json_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        raise click.UsageError(
            "--json is now --output json here (--json only says that a message is JSON, in "
            "`send` and `run`)",
            ctx,
        )
    return value


output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format: text for people, json for programs.",
)


def old_json_flag(fn: F) -> F:
    """A hidden ``--json`` that says it is now ``--output json`` (on commands whose ``--json``
    never meant "the message is JSON")."""
    return click.option(
        "--json",
        "old_json",
        is_flag=True,
        hidden=True,
        expose_value=False,
        callback=_old_json_flag,
    )(fn)


def dumps(value: Any) -> str:
    """Compact JSON text."""
    return orjson.dumps(value).decode()


def parse_json(text: str, what: str) -> Any:
    """``text`` decoded as JSON.

    Raises:
        click.BadParameter: it is not JSON.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from None


def message_of(text: str, is_json: bool) -> Any:
    """The payload of a MESSAGE argument: JSON with ``--json``, else ``{"text": text}``."""
    return parse_json(text, "MESSAGE") if is_json else {"text": text}


def path_of(url: str) -> str:
    """An entity URL as a path (``/type/id``)."""
    return "/" + url.strip("/")


def report(
    replies: list[Any],
    status: str | None,
    error: str | None,
    wait_s: float,
    output: str,
    extra: dict[str, Any] | None = None,
) -> int:
    """Print the replies to a message (an ``on_error`` reply too) and, when its wake was given
    up, the error (stderr); return the exit code. With ``output == "json"``, one JSON object
    ``{..extra, replies, status, error}`` on stdout instead (the error still on stderr)."""
    if output == "json":
        click.echo(dumps({**(extra or {}), "replies": replies, "status": status, "error": error}))
    else:
        for value in replies:
            click.echo(value if isinstance(value, str) else dumps(value))
    if status in ("dead_lettered", "cancelled"):
        click.echo(
            f"error: the wake was {status.replace('_', '-')}: {error or 'no error'}", err=True
        )
        return EXIT_FAILED
    if not replies:
        click.echo(f"error: no reply within {wait_s:g} s (status {status or 'pending'})", err=True)
        return EXIT_NO_ANSWER
    return EXIT_COMPLETED
