"""``python -m streams``: command-line entry points of the streams package."""

from __future__ import annotations

import logging

import click

from .server import ServerSettings, serve


@click.group()
def main() -> None:
    """Durable streams: append-only offset logs served over HTTP."""


@main.command("serve")
@click.option(
    "--db",
    default="sqlite:///.entities/entities.db",
    show_default=True,
    help="Store URL: memory://, sqlite:///path/to.db or postgresql://...",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=4437, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--long-poll-ms",
    default=30_000,
    show_default=True,
    type=click.IntRange(1),
    help="How long a live=long-poll request waits for data before answering 204.",
)
@click.option(
    "--sse-max-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="How long one SSE connection stays open before the server ends it.",
)
@click.option(
    "--max-body-bytes",
    default=ServerSettings().max_body_bytes,
    show_default=True,
    type=click.IntRange(1),
    help="Largest accepted request body (larger ones get 413).",
)
@click.option(
    "--allow-private-webhooks",
    is_flag=True,
    help="Let webhooks go to loopback, private and link-local addresses (refused by default, "
    "in every notation, after resolving the host).",
)
@click.option(
    "--allow-loopback-webhooks",
    is_flag=True,
    help="Let webhooks go to loopback addresses (workers on this host); other internal "
    "addresses stay refused.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve_command(
    db: str,
    host: str,
    port: int,
    long_poll_ms: int,
    sse_max_s: float,
    max_body_bytes: int,
    allow_private_webhooks: bool,
    allow_loopback_webhooks: bool,
    log_level: str,
) -> None:
    """Serve the Durable Streams protocol at http://HOST:PORT/v1/stream/{path}."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)-9s %(name)s: %(message)s")
    settings = ServerSettings(
        long_poll_timeout_s=long_poll_ms / 1000,
        sse_max_duration_s=sse_max_s,
        max_body_bytes=max_body_bytes,
        allow_private_webhooks=allow_private_webhooks,
        allow_loopback_webhooks=allow_loopback_webhooks,
    )
    serve(db, host=host, port=port, settings=settings, log_level=log_level)


if __name__ == "__main__":
    main()
