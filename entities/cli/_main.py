"""``entities`` commands. Server-side: ``serve``, ``worker``, ``run``. Client-side (over HTTP,
``--server`` / ``ENTITIES_URL``): ``spawn``, ``send``, ``view``, ``observe``, ``ps``, ``inspect``,
``kill``, ``types``, ``workers``."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
from typing import Any

import anyio
import click
import orjson

from streams import open_store
from streams.server import ServerSettings

from .._errors import EntitiesError
from .._records import APP_NS, Outcome
from .._runtime import DEFAULT_WAKE_TIMEOUT, Runtime
from .._urls import parse_url
from ..server import ServeOptions
from ..server import serve as run_serve
from ._app import load_registry
from ._client import Client

__all__ = ["cli", "main"]

DEFAULT_DB = "sqlite:///.entities/entities.db"
DEFAULT_SERVER = "http://127.0.0.1:4437"

db_option = click.option(
    "--db",
    default=lambda: os.environ.get("ENTITIES_DB", DEFAULT_DB),
    show_default=DEFAULT_DB,
    help="Store URL: sqlite:///path, postgresql://... or memory:// (env ENTITIES_DB).",
)
server_option = click.option(
    "--server",
    default=lambda: os.environ.get("ENTITIES_URL", DEFAULT_SERVER),
    show_default=DEFAULT_SERVER,
    help="Server URL (env ENTITIES_URL).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
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


idempotency_option = click.option(
    "--idempotency-key",
    default=None,
    help="Apply this request once: sent again with the same key (within a day), it changes "
    "nothing and gets the first answer; a failed connection is retried.",
)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _parse_json(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from None


def _message(text: str, as_json: bool) -> Any:
    return _parse_json(text, "MESSAGE") if as_json else {"text": text}


def _logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="entities-runtime")
def cli(verbose: int) -> None:
    """A durable entity runtime over event streams."""
    _logging(verbose)


# -- server side --------------------------------------------------------------------------------


@cli.command()
@click.argument("app")
@db_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=4437, show_default=True, type=int)
@click.option(
    "--token",
    default=lambda: os.environ.get("ENTITIES_TOKEN"),
    help="Require this bearer token on every request (env ENTITIES_TOKEN).",
)
@click.option("--no-worker", is_flag=True, help="Serve HTTP only; run workers separately.")
@click.option("--concurrency", default=64, show_default=True, type=int)
@click.option("--long-poll-ms", default=30_000, show_default=True, type=int)
@click.option("--sse-max-s", default=60.0, show_default=True, type=float)
@click.option("--max-body-bytes", default=1024 * 1024, show_default=True, type=int)
@lease_option
@wake_timeout_option
def serve(
    app: str,
    db: str,
    host: str,
    port: int,
    token: str | None,
    no_worker: bool,
    concurrency: int,
    long_poll_ms: int,
    sse_max_s: float,
    max_body_bytes: int,
    lease_seconds: float,
    wake_timeout: float,
) -> None:
    """Serve HTTP (control plane, Durable Streams, dev UI) with an embedded worker."""
    registry = load_registry(app)
    settings = ServerSettings(long_poll_timeout_s=long_poll_ms / 1000, sse_max_duration_s=sse_max_s)
    options = ServeOptions(
        host=host,
        port=port,
        token=token,
        worker=not no_worker,
        max_body_bytes=max_body_bytes,
        streams=settings,
    )

    async def ready(url: str) -> None:
        names = ", ".join(t.name for t in registry.list()) or "(none)"
        click.echo(f"entities: serving {url} over {db} (types: {names})", err=True)
        click.echo(f"  send:  entities send /TYPE/ID 'hello' --server {url}", err=True)
        click.echo(f"  read:  curl '{url}/v1/stream/TYPE/ID/main?offset=-1'", err=True)

    async def main() -> None:
        async with Runtime(
            registry,
            db,
            concurrency=concurrency,
            lease_seconds=lease_seconds,
            wake_timeout=wake_timeout,
        ) as rt:
            await run_serve(rt, options, ready=ready)

    try:
        anyio.run(main)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.argument("app")
@db_option
@click.option("--concurrency", default=64, show_default=True, type=int)
@click.option("--worker-id", default=None, help="Name of this worker (default: random).")
@lease_option
@wake_timeout_option
def worker(
    app: str,
    db: str,
    concurrency: int,
    worker_id: str | None,
    lease_seconds: float,
    wake_timeout: float,
) -> None:
    """Run wakes only (no HTTP). SIGTERM/SIGINT drain in-flight wakes, then exit."""
    registry = load_registry(app)

    async def main() -> None:
        async with Runtime(
            registry,
            db,
            concurrency=concurrency,
            worker_id=worker_id,
            lease_seconds=lease_seconds,
            wake_timeout=wake_timeout,
        ) as rt:
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stop_on_signals, stop)
                click.echo(f"entities: worker {rt.worker_id} on {db}", err=True)
                await rt.worker().run(stop)
                tg.cancel_scope.cancel()

    anyio.run(main)


async def _stop_on_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop.set()
            return


@cli.command()
@click.argument("app")
@click.argument("url")
@click.argument("message")
@db_option
@click.option("--type", "message_type", default=None, help="Message type.")
@click.option("--args", "args_json", default=None, help="Spawn args (JSON) if the entity is new.")
@click.option("--timeout", default=300.0, show_default=True, type=float, help="Seconds to wait.")
@lease_option
@wake_timeout_option
@json_option
def run(
    app: str,
    url: str,
    message: str,
    db: str,
    message_type: str | None,
    args_json: str | None,
    timeout: float,
    lease_seconds: float,
    wake_timeout: float,
    as_json: bool,
) -> None:
    """Spawn URL if needed, send MESSAGE, process it in this process, print the reply, exit.

    MESSAGE is text (sent as {"text": ...}) unless --json.
    """
    registry = load_registry(app)
    payload = _message(message, as_json)
    args = _parse_json(args_json, "--args") if args_json else None
    code = anyio.run(
        _run_attached,
        registry,
        db,
        url,
        payload,
        message_type,
        args,
        timeout,
        as_json,
        lease_seconds,
        wake_timeout,
    )
    sys.exit(code)


async def _run_attached(
    registry: Any,
    db: str,
    url: str,
    payload: Any,
    message_type: str | None,
    args: Any,
    timeout_s: float,
    as_json: bool,
    lease_seconds: float = 30.0,
    wake_timeout: float = DEFAULT_WAKE_TIMEOUT,
) -> int:
    async with Runtime(registry, db, lease_seconds=lease_seconds, wake_timeout=wake_timeout) as rt:
        try:
            if await rt.lookup(url) is None:
                await rt.spawn(url, args=args)
            receipt = await rt.send(url, payload, type=message_type, sender="/_cli/run")
        except EntitiesError as exc:  # a bad URL, type or message: the caller's to fix
            click.echo(f"error: {exc.code}: {exc.message}", err=True)
            return EXIT_USAGE
        stop = anyio.Event()
        found = Outcome()
        open_line: list[bool] = []
        stream = f"{url.strip('/')}/main"

        async def watch() -> None:
            nonlocal found
            shown = receipt.offset
            while not stop.is_set():
                tail = (await rt.store.head(stream)).next_offset
                found = await rt.outcome(url, receipt.key, after=receipt.offset)
                if not as_json:  # partials precede the reply in the stream: all shown by now
                    shown = await _show_deltas(rt, url, shown, open_line)
                if found.replies or found.failed:
                    stop.set()
                    return
                await rt.store.wait(stream, tail, 1.0)

        with anyio.move_on_after(timeout_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await rt.worker(poll_interval=0.2).run(stop)
        if open_line and open_line[-1]:
            click.echo("", err=True)  # end the line of streamed partials
        return _report(found.replies, found.status, found.error, timeout_s, as_json)


async def _show_deltas(rt: Runtime, url: str, after: str, open_line: list[bool]) -> str:
    """Print the ``text_deltas`` (streamed partials) appended after ``after`` to stderr, as
    they arrive; return the offset read up to."""
    while True:
        events, offset = await rt.read(url, after, limit=1000)
        for item in events:
            delta = (item.get("value") or {}).get("delta")
            if item["type"] == "text_deltas" and isinstance(delta, str) and delta:
                click.echo(delta, nl=False, err=True)
                open_line.append(not delta.endswith("\n"))
        if len(events) < 1000:
            return offset
        after = offset


async def _recorded_app(db: str, type_: str) -> str:
    async with open_store(db) as store:
        source = await store.kv_get(APP_NS, type_)
    if source is None:
        raise click.ClickException(
            f"no code is recorded for type {type_!r} in {db}; pass --app module:attr"
        )
    return source.decode()


@cli.command()
@click.argument("url")
@click.option(
    "--app",
    "app",
    default=None,
    help="APP (module:attr or file.py:attr); default: where `entities run/serve/worker` "
    "last loaded the URL's type from (recorded in the store).",
)
@db_option
@click.option("--wake", "wake", default=None, help="Only the N-th wake (1-based) or a wake id.")
@json_option
def replay(url: str, app: str | None, db: str, wake: str | None, as_json: bool) -> None:
    """Re-execute URL's recorded wakes against their journal (no network, no writes) and
    report any divergence. Exits 1 when a wake diverged."""
    target = parse_url(url)
    if app is None:
        app = anyio.run(_recorded_app, db, target.type)
    registry = load_registry(app)
    which: int | str | None = int(wake) if wake and wake.isdigit() else wake

    async def main() -> Any:
        async with Runtime(registry, db) as rt:
            return await rt.replay(target.url, wake=which)

    try:
        report = anyio.run(main)
    except EntitiesError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    if as_json:
        click.echo(_json(report.to_json()))
    else:
        for w in report.wakes:
            mark = "ok" if w.ok else "DIVERGED"
            click.echo(f"wake {w.index} {w.wake_id} ({w.status}): {mark}")
            for d in w.divergences:
                click.echo(f"  {d.message}")
                click.echo(f"    where:    {d.where}")
                click.echo(f"    expected: {_json(d.expected)}")
                click.echo(f"    got:      {_json(d.got)}")
        total = len(report.wakes)
        bad = sum(1 for w in report.wakes if not w.ok)
        click.echo(
            f"{total} wakes replayed, {bad} diverged"
            if bad
            else f"{total} wakes replayed, no divergence"
        )
    sys.exit(0 if report.ok else 1)


# -- client side --------------------------------------------------------------------------------


@cli.command()
@click.argument("url")
@server_option
@click.option("--args", "args_json", default=None, help="Spawn args as JSON.")
@click.option("--tag", "tags", multiple=True, help="key=value (repeatable).")
@idempotency_option
@json_option
def spawn(
    url: str,
    server: str,
    args_json: str | None,
    tags: tuple[str, ...],
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Create the entity at URL (/type/id)."""
    body: dict[str, Any] = {"args": _parse_json(args_json, "--args") if args_json else None}
    malformed = [t for t in tags if "=" not in t or not t.split("=", 1)[0]]
    if malformed:
        raise click.BadParameter(f"expected key=value, got {malformed[0]!r}", param_hint="--tag")
    body["tags"] = dict(t.split("=", 1) for t in tags)
    info = Client(server).request(
        "PUT", f"/_entities/entities{_path(url)}", body, idempotency_key=idempotency_key
    )
    click.echo(_json(info) if as_json else f"spawned {info['url']}")


@cli.command()
@click.argument("url")
@click.argument("message")
@server_option
@click.option("--type", "message_type", default=None, help="Message type.")
@click.option(
    "--wait",
    "wait_s",
    default=0.0,
    type=float,
    help="Wait up to this many seconds for the reply and print it. Exit status: 0 replied, "
    "1 the wake was given up (its error is printed), 3 no answer in time.",
)
@idempotency_option
@json_option
def send(
    url: str,
    message: str,
    server: str,
    message_type: str | None,
    wait_s: float,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Send MESSAGE to URL (text is wrapped as {"text": ...} unless --json)."""
    client = Client(server, timeout=max(30.0, wait_s + 10))
    receipt = client.request(
        "POST",
        f"/_entities/entities{_path(url)}/send",
        {"payload": _message(message, as_json), "type": message_type},
        idempotency_key=idempotency_key,
    )
    if wait_s <= 0:
        click.echo(_json(receipt) if as_json else f"sent {receipt['key']} to {receipt['url']}")
        return
    answer = client.request(
        "GET",
        f"/_entities/entities{_path(url)}/replies/{receipt['key']}",
        wait_ms=int(wait_s * 1000),
        after=receipt["offset"],
    )
    sys.exit(_report(answer["replies"], answer.get("status"), answer.get("error"), wait_s, as_json))


# exit codes of ``send --wait`` and ``run``
EXIT_COMPLETED, EXIT_FAILED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3


def _report(
    replies: list[Any], status: str | None, error: str | None, wait_s: float, as_json: bool
) -> int:
    """Print the replies to a message (an ``on_error`` reply too) and, when its wake was given
    up, the error (stderr); return the exit code."""
    for value in replies:
        click.echo(_json(value) if as_json or not isinstance(value, str) else value)
    if status in ("dead_lettered", "cancelled"):
        click.echo(
            f"error: the wake was {status.replace('_', '-')}: {error or 'no error'}", err=True
        )
        return EXIT_FAILED
    if not replies:
        click.echo(f"error: no reply within {wait_s:g} s (status {status or 'pending'})", err=True)
        return EXIT_NO_ANSWER
    return EXIT_COMPLETED


def _path(url: str) -> str:
    return "/" + url.strip("/")


def _describe(item: dict[str, Any]) -> str:
    operation = item.get("headers", {}).get("operation", "?")
    value = item.get("value")
    text = _json(value)
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{item.get('type', '?'):<16} {operation:<7} {item.get('key', ''):<24} {text}"


@cli.command()
@click.argument("url")
@server_option
@click.option("--from", "offset", default="-1", show_default=True, help="Start offset.")
@json_option
def view(url: str, server: str, offset: str, as_json: bool) -> None:
    """Print an entity's stream once."""
    for item, _ in Client(server).stream_events(_path(url), offset, live=False):
        click.echo(_json(item) if as_json else _describe(item))


@cli.command()
@click.argument("url")
@server_option
@click.option("--from", "offset", default="-1", show_default=True, help="Start offset.")
@json_option
def observe(url: str, server: str, offset: str, as_json: bool) -> None:
    """Tail an entity's stream live (until Ctrl-C)."""
    try:
        for item, _ in Client(server).stream_events(_path(url), offset, live=True):
            click.echo(_json(item) if as_json else _describe(item))
    except KeyboardInterrupt:
        pass


@cli.command()
@server_option
@click.option("--type", "type_", default=None)
@click.option(
    "--status",
    default=None,
    type=click.Choice(["idle", "running", "stopped", "failed"]),
    help="failed: idle with dead letters.",
)
@click.option("--tag", default=None, help="key or key=value")
@click.option("--parent", default=None)
@json_option
def ps(
    server: str,
    type_: str | None,
    status: str | None,
    tag: str | None,
    parent: str | None,
    as_json: bool,
) -> None:
    """List entities."""
    items = Client(server).request(
        "GET", "/_entities/entities", type=type_, status=status, tag=tag, parent=parent
    )
    if as_json:
        click.echo(_json(items))
        return
    click.echo(f"{'URL':<40} {'STATUS':<8} {'RUNS':>5} {'QUEUE':>5} {'CREATED':<25} LAST ACTIVE")
    for e in items:
        click.echo(
            f"{e['url']:<40} {e['status']:<8} {e['runs']:>5} {e.get('queue', 0):>5} "
            f"{e['created_at']:<25} {e['last_active'] or ''}"
        )


@cli.command()
@server_option
@json_option
def workers(server: str, as_json: bool) -> None:
    """List the workers sharing the server's store (live: renewed in the last few seconds)."""
    items = Client(server).request("GET", "/_entities/workers")
    if as_json:
        click.echo(_json(items))
        return
    click.echo(f"{'WORKER':<24} {'LIVE':<5} {'HOST':<24} {'PID':>8}  LAPSES AT")
    for w in items:
        lapses = datetime.datetime.fromtimestamp(w["expires"], datetime.UTC).isoformat()
        live = "yes" if w["live"] else "no"
        click.echo(f"{w['id']:<24} {live:<5} {w['host']:<24} {w['pid']:>8}  {lapses}")


@cli.command("dead-letters")
@server_option
@click.option("--type", "type_", default=None, help="Only this entity type's.")
@click.option("--url", default=None, help="Only this entity's.")
@json_option
def dead_letters(server: str, type_: str | None, url: str | None, as_json: bool) -> None:
    """List wakes given up after their last attempt (retry them with `entities retry ID`)."""
    items = Client(server).request("GET", "/_entities/dead-letters", type=type_, url=url)
    if as_json:
        click.echo(_json(items))
        return
    click.echo(f"{'ID':<40} {'ATTEMPTS':>8} {'MESSAGES':>8}  {'TIME':<25} ERROR")
    for d in items:
        error = d["error"] if len(d["error"]) <= 60 else d["error"][:57] + "..."
        click.echo(f"{d['id']:<40} {d['attempts']:>8} {d['messages']:>8}  {d['time']:<25} {error}")


@cli.command()
@click.argument("id")
@server_option
def retry(id: str, server: str) -> None:
    """Deliver the messages of dead letter ID again, as a new wake."""
    done = Client(server).request("POST", f"/_entities/dead-letters/{id}/retry")
    click.echo(f"retried {done['retried']} ({done['url']})")


@cli.command()
@click.argument("id")
@server_option
def discard(id: str, server: str) -> None:
    """Drop dead letter ID for good."""
    done = Client(server).request("DELETE", f"/_entities/dead-letters/{id}")
    click.echo(f"discarded {done['discarded']}")


@cli.command()
@click.argument("url")
@server_option
def inspect(url: str, server: str) -> None:
    """Print everything about an entity as JSON."""
    data = Client(server).request("GET", f"/_entities/entities{_path(url)}")
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@cli.command()
@click.argument("url")
@server_option
def kill(url: str, server: str) -> None:
    """Stop an entity for good."""
    info = Client(server).request("DELETE", f"/_entities/entities{_path(url)}")
    click.echo(f"{info['url']} {info['status']}")


@cli.command()
@server_option
@json_option
def types(server: str, as_json: bool) -> None:
    """List the server's entity types."""
    items = Client(server).request("GET", "/_entities/types")
    if as_json:
        click.echo(_json(items))
        return
    for t in items:
        click.echo(f"{t['name']:<20} {t['description']}")


def main() -> None:
    """Console-script entry point."""
    cli()
