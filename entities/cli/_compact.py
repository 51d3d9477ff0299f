"""``entities compact URL | --all``: compaction now, over HTTP to ``entities serve``."""

from __future__ import annotations

import click

from ._client import Client
from ._common import dumps, output_option, path_of, server_option, token_option

__all__ = ["compact"]


@click.command()
@click.argument("url", required=False)
@click.option("--all", "every", is_flag=True, help="Compact every entity.")
@server_option
@token_option
@output_option
def compact(url: str | None, every: bool, server: str, token: str | None, output: str) -> None:
    """Remove what an entity's retention policy lets go (text deltas of ended runs, old journal
    steps, and with keep_for the prefix before an old snapshot); print what went."""
    if (url is None) == (not every):
        raise click.UsageError("give an entity URL or --all (not both)")
    client = Client(server, token)
    if every:
        done = client.request("POST", "/_entities/compact")
    else:
        assert url is not None
        done = client.request("POST", f"/_entities/entities{path_of(url)}/compact")
    if output == "json":
        click.echo(dumps(done))
        return
    kinds = f"{done['text_deltas']} text deltas, {done['steps']} journal steps, {done['prefix']} "
    click.echo(
        f"removed {done['events']} events ({done['bytes']} bytes) from {done['entities']} "
        f"entities: {kinds}prefix events"
    )
    for where, offset in sorted(done["truncated"].items()):
        click.echo(f"{where}: history before {offset} truncated")
