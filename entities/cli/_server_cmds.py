"""Commands that open the store themselves: ``serve``, ``worker``, ``run``, ``replay``."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from functools import partial
from typing import Any

import anyio
import click

from streams.server import ServerSettings

from .._errors import EntitiesError
from .._records import APP_NS, Outcome
from .._registry import Registry
from .._replay import ReplayReport
from .._runtime import Runtime
from .._urls import parse_url
from ..server import AuthConfig, AuthFileError, ServeOptions, load_auth, serve_metrics
from ..server import serve as run_serve
from ._app import load_registry
from ._common import (
    EXIT_USAGE,
    compact_every_option,
    dumps,
    lease_option,
    message_json_option,
    message_of,
    old_json_flag,
    output_option,
    parse_json,
    report,
    wake_timeout_option,
)
from ._db import Problem, UsageProblem, db_option, open_db, probe_postgres, redact, require_db
from ._heap import settle_heap
from ._logs import adopt_uvicorn_loggers, json_logs

__all__ = ["replay", "run", "serve", "worker"]

logger = logging.getLogger("entities.cli")

# how long ``serve`` and ``worker`` wait for a PostgreSQL that does not answer yet
DB_WAIT_SECONDS = 15.0

deploy_version_option = click.option(
    "--deploy-version",
    envvar="ENTITIES_DEPLOY_VERSION",
    default=None,
    help="A name for the code this process runs (a release tag, a commit; env "
    "ENTITIES_DEPLOY_VERSION): announced with the worker's types (`entities workers`) and "
    "recorded in the runs row of every wake it runs.",
)


def _check_port(host: str, port: int) -> None:
    """Fail in one line when ``host:port`` cannot be listened on (in use, not an address of
    this machine), before the store is opened and uvicorn logs it its own way.

    Raises:
        Problem: it cannot.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise Problem(f"cannot serve on {host}:{port} ({reason.lower()})") from None


def _announce(lines: list[str], message: str, **fields: Any) -> None:
    """Say what a server or worker is doing as it starts: ``lines`` on stderr, or, with
    ``--log-format json``, ``message`` and ``fields`` as one JSON log line."""
    if json_logs():
        logger.info(message, extra=fields)
    else:
        for line in lines:
            click.echo(line, err=True)


def _auth_of(auth_file: str | None, token: str | None) -> AuthConfig | None:
    """The principals of ``--auth FILE``, if given.

    Raises:
        UsageProblem: the file is bad (the message names the field), or ``--token`` is given
            too.
    """
    if auth_file is None:
        return None
    if token:
        raise UsageProblem(
            "--auth and --token (or ENTITIES_TOKEN) together: give the admin a principal in "
            "the auth file instead"
        )
    try:
        return load_auth(auth_file)
    except AuthFileError as exc:
        raise UsageProblem(f"--auth {exc}") from None


@click.command()
@click.argument("app")
@db_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=4437, show_default=True, type=int)
@click.option(
    "--token",
    envvar="ENTITIES_TOKEN",
    default=None,
    help="Require this bearer token on every request (env ENTITIES_TOKEN): one admin.",
)
@click.option(
    "--auth",
    "auth_file",
    default=None,
    help="Principals, their tokens and grants (a JSON or .toml file); not with --token.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="An origin (https://host[:port]) whose pages may call the control plane (repeatable).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="A Host name to answer for besides the loopback names (repeatable).",
)
@click.option("--no-worker", is_flag=True, help="Serve HTTP only; run workers separately.")
@click.option(
    "--access-log",
    is_flag=True,
    help="Log one line per HTTP request (uvicorn's access log, logger uvicorn.access).",
)
@click.option("--concurrency", default=64, show_default=True, type=int)
@click.option("--long-poll-ms", default=30_000, show_default=True, type=int)
@click.option("--sse-max-s", default=60.0, show_default=True, type=float)
@click.option("--max-body-bytes", default=1024 * 1024, show_default=True, type=int)
@lease_option
@wake_timeout_option
@compact_every_option
@deploy_version_option
def serve(
    app: str,
    db: str,
    host: str,
    port: int,
    token: str | None,
    auth_file: str | None,
    cors_origins: tuple[str, ...],
    allowed_hosts: tuple[str, ...],
    no_worker: bool,
    access_log: bool,
    concurrency: int,
    long_poll_ms: int,
    sse_max_s: float,
    max_body_bytes: int,
    lease_seconds: float,
    wake_timeout: float,
    compact_every: float,
    deploy_version: str | None,
) -> None:
    """Serve HTTP (control plane, Durable Streams, console at /ui/) with an embedded worker.

    A PostgreSQL --db that does not answer yet is waited for, up to 15 s."""
    auth = _auth_of(auth_file, token)
    registry = load_registry(app)
    _check_port(host, port)
    probe_postgres(db, wait=DB_WAIT_SECONDS)
    settings = ServerSettings(long_poll_timeout_s=long_poll_ms / 1000, sse_max_duration_s=sse_max_s)
    options = ServeOptions(
        host=host,
        port=port,
        token=token,
        auth=auth,
        cors_origins=cors_origins,
        allowed_hosts=allowed_hosts,
        worker=not no_worker,
        max_body_bytes=max_body_bytes,
        streams=settings,
    )

    async def ready(url: str) -> None:
        adopt_uvicorn_loggers(access_log=access_log)
        names = [t.name for t in registry.list()]
        console = f"{url}/ui/"
        lines = [
            f"entities: serving {url} over {redact(db)} (types: {', '.join(names) or '(none)'})",
            f"  console: {console}",
            f"  send:    entities send /TYPE/ID 'hello' --server {url}",
            f"  read:    curl '{url}/v1/stream/TYPE/ID/main?offset=-1'",
        ]
        _announce(lines, f"serving {url}", url=url, console=console, db=redact(db), types=names)
        settle_heap()  # started: what start-up allocated stays (see _heap)

    async def main() -> None:
        async with (
            open_db(db) as store,
            Runtime(
                registry,
                store,
                concurrency=concurrency,
                lease_seconds=lease_seconds,
                wake_timeout=wake_timeout,
                compact_every=compact_every or None,
                deploy_version=deploy_version,
            ) as rt,
        ):
            await run_serve(rt, options, ready=ready)

    try:
        anyio.run(main)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.argument("app")
@db_option
@click.option("--concurrency", default=64, show_default=True, type=int)
@click.option("--worker-id", default=None, help="Name of this worker (default: random).")
@lease_option
@wake_timeout_option
@compact_every_option
@click.option(
    "--metrics-port",
    default=None,
    type=click.IntRange(min=0, max=65535),
    help="Serve /metrics, /healthz and /readyz on this port (0: any free one).",
)
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True, help="Address of --metrics-port."
)
@deploy_version_option
def worker(
    app: str,
    db: str,
    concurrency: int,
    worker_id: str | None,
    lease_seconds: float,
    wake_timeout: float,
    compact_every: float,
    metrics_port: int | None,
    metrics_host: str,
    deploy_version: str | None,
) -> None:
    """Run wakes only (no HTTP API; with --metrics-port, the operations endpoints).
    SIGTERM/SIGINT drain in-flight wakes, then exit.

    A PostgreSQL --db that does not answer yet is waited for, up to 15 s."""
    registry = load_registry(app)
    probe_postgres(db, wait=DB_WAIT_SECONDS)

    async def main() -> None:
        async with (
            open_db(db) as store,
            Runtime(
                registry,
                store,
                concurrency=concurrency,
                worker_id=worker_id,
                lease_seconds=lease_seconds,
                wake_timeout=wake_timeout,
                compact_every=compact_every or None,
                deploy_version=deploy_version,
            ) as rt,
        ):
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stop_on_signals, stop)
                names = [t.name for t in registry.list()]
                version = f", version {deploy_version}" if deploy_version else ""
                _announce(
                    [
                        f"entities: worker {rt.worker_id} on {redact(db)} "
                        f"(types: {', '.join(names) or '(none)'}{version})"
                    ],
                    f"worker {rt.worker_id} started",
                    worker=rt.worker_id,
                    db=redact(db),
                    types=names,
                    deploy_version=deploy_version,
                )
                runner = rt.worker()
                settle_heap()  # started: what start-up allocated stays (see _heap)
                if metrics_port is not None:
                    serving = partial(serve_metrics, rt, runner, host=metrics_host)
                    tg.start_soon(partial(serving, port=metrics_port, ready=_metrics_banner))
                await runner.run(stop)
                tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def _metrics_banner(url: str) -> None:
    _announce([f"entities: metrics on {url}/metrics"], "metrics served", url=f"{url}/metrics")


async def _stop_on_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop.set()
            return


@click.command()
@click.argument("app")
@click.argument("url")
@click.argument("message")
@db_option
@click.option("--type", "message_type", default=None, help="Message type.")
@click.option("--args", "args_json", default=None, help="Spawn args (JSON) if the entity is new.")
@click.option("--timeout", default=300.0, show_default=True, type=float, help="Seconds to wait.")
@message_json_option
@output_option
@lease_option
@wake_timeout_option
def run(
    app: str,
    url: str,
    message: str,
    db: str,
    message_type: str | None,
    args_json: str | None,
    timeout: float,
    message_is_json: bool,
    output: str,
    lease_seconds: float,
    wake_timeout: float,
) -> None:
    """Spawn URL if needed, send MESSAGE, process it in this process, print the reply, exit.

    MESSAGE is text (sent as {"text": ...}) unless --json. Exit status: 0 replied, 1 the wake
    was given up (its error is printed), 2 a usage error, 3 no reply within --timeout. With
    --output json: one object {url, key, replies, status, error}.
    """
    registry = load_registry(app)
    payload = message_of(message, message_is_json)
    args = parse_json(args_json, "--args") if args_json else None
    probe_postgres(db)
    code = anyio.run(
        _run_attached,
        registry,
        db,
        url,
        payload,
        message_type,
        args,
        timeout,
        output,
        lease_seconds,
        wake_timeout,
    )
    sys.exit(code)


async def _run_attached(
    registry: Registry,
    db: str,
    url: str,
    payload: Any,
    message_type: str | None,
    args: Any,
    timeout_s: float,
    output: str,
    lease_seconds: float,
    wake_timeout: float,
) -> int:
    async with (
        open_db(db) as store,
        Runtime(registry, store, lease_seconds=lease_seconds, wake_timeout=wake_timeout) as rt,
    ):
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
                if output == "text":  # partials precede the reply in the stream: all shown
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
        extra = {"url": receipt.url, "key": receipt.key}
        return report(found.replies, found.status, found.error, timeout_s, output, extra)


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
    async with open_db(db, read_only=True) as store:
        source = await store.kv_get(APP_NS, type_)
    if source is None:
        raise click.ClickException(
            f"no code is recorded for type {type_!r} in {redact(db)}; pass --app module:attr"
        )
    return source.decode()


@click.command()
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
@output_option
@old_json_flag
def replay(url: str, app: str | None, db: str, wake: str | None, output: str) -> None:
    """Re-execute URL's recorded wakes against their journal (no network, no writes) and
    report any divergence. Exits 1 when a wake diverged.

    Reads the store only: a --db file that does not exist is an error, never created."""
    try:
        target = parse_url(url)
    except EntitiesError as exc:
        raise click.BadParameter(f"{exc.code}: {exc.message}", param_hint="URL") from None
    require_db(db)
    probe_postgres(db)
    if app is None:
        app = anyio.run(_recorded_app, db, target.type)
    registry = load_registry(app)
    registry.source = None  # replay writes nothing, not even where the code was loaded from
    which: int | str | None = int(wake) if wake and wake.isdigit() else wake

    async def main() -> ReplayReport:
        async with open_db(db, read_only=True) as store, Runtime(registry, store) as rt:
            return await rt.replay(target.url, wake=which)

    try:
        report_ = anyio.run(main)
    except EntitiesError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    if output == "json":
        click.echo(dumps(report_.to_json()))
    else:
        _print_replay(report_)
    sys.exit(0 if report_.ok else 1)


def _print_replay(report_: ReplayReport) -> None:
    for w in report_.wakes:
        mark = "ok" if w.ok else "DIVERGED"
        if w.compacted is not None:
            mark = f"not replayed: {w.compacted}"
        click.echo(f"wake {w.index} {w.wake_id} ({w.status}): {mark}")
        for d in w.divergences:
            click.echo(f"  {d.message}")
            click.echo(f"    where:    {d.where}")
            click.echo(f"    expected: {dumps(d.expected)}")
            click.echo(f"    got:      {dumps(d.got)}")
    total = len(report_.wakes)
    bad = sum(1 for w in report_.wakes if not w.ok)
    click.echo(
        f"{total} wakes replayed, {bad} diverged"
        if bad
        else f"{total} wakes replayed, no divergence"
    )
