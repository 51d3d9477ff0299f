"""``--db``: the store URL, checked before anything is opened, and opened with one-line errors.

A URL of the wrong form (``demo.db``, ``mysql://...``) is a usage error (exit 2); a database that
cannot be opened (PostgreSQL down or refusing, a file that is no database) is one line (exit 1);
commands that only read (``replay``) never create a SQLite file or its folder.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import click
from click.core import ParameterSource

from streams import BackendUnavailable, Store, open_store, sqlite_path

__all__ = [
    "DEFAULT_DB",
    "FORMS",
    "DbProblem",
    "Problem",
    "UsageProblem",
    "check_db_url",
    "db_option",
    "open_db",
    "probe_postgres",
    "redact",
    "require_db",
    "sqlite_file",
]

logger = logging.getLogger(__name__)

DEFAULT_DB = "sqlite:///.entities/entities.db"
FORMS = "sqlite:///path/to/file.db, postgresql://user@host/db or memory://"
SCHEMES = {"sqlite", "postgres", "postgresql", "memory"}


class Problem(click.ClickException):
    """Why a command cannot go on, told in one line (``error: ...``); exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class UsageProblem(Problem):
    """A mistake in the command line, told in one line; exit status 2."""

    exit_code = 2


class DbProblem(Problem):
    """A store that cannot be opened; exit status 1."""


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


def sqlite_file(url: str) -> Path:
    """The file a ``sqlite:///relative`` or ``sqlite:////absolute`` URL names (the store's own
    rule: :func:`streams.sqlite_path`).

    Raises:
        UsageProblem: the URL names no file.
    """
    try:
        return sqlite_path(url)
    except BackendUnavailable:
        raise UsageProblem(f"--db {url!r} names no file; use {FORMS}") from None


def check_db_url(url: str, name: str = "--db") -> str:
    """``url`` if it has the form of a store URL.

    Raises:
        UsageProblem: it has not (no scheme, an unknown one, a sqlite URL without a path).
    """
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme not in SCHEMES:
        raise UsageProblem(f"{name} {redact(url)!r} is not a store URL; use {FORMS}")
    if scheme == "sqlite":
        sqlite_file(url)
    return url


def _check_db_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from_env = (
        ctx.get_parameter_source("db") is ParameterSource.DEFAULT and "ENTITIES_DB" in os.environ
    )
    return check_db_url(value, "ENTITIES_DB" if from_env else "--db")


db_option = click.option(
    "--db",
    default=lambda: os.environ.get("ENTITIES_DB", DEFAULT_DB),
    show_default=DEFAULT_DB,
    callback=_check_db_option,
    help="Store URL: sqlite:///path, postgresql://user@host/db or memory:// (env ENTITIES_DB).",
)


def _postgres_address(url: str) -> tuple[str, int] | str | None:
    """Where a ``postgresql://`` URL connects: ``(host, port)``, a Unix socket path, or ``None``
    when that is not plain to see (several hosts, libpq environment defaults)."""
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        port = parts.port or int(query.get("port", ["5432"])[0])
        host = parts.hostname or query.get("host", [""])[0]
    except ValueError:
        return None
    if not host or "," in host:
        return None
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return host, port


def _connect(address: tuple[str, int] | str, timeout: float) -> None:
    """Open and close a connection to ``address``; raises OSError when that fails."""
    if isinstance(address, str):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
    else:
        socket.create_connection(address, timeout=timeout).close()


def probe_postgres(url: str, *, wait: float = 0.0, timeout: float = 3.0) -> None:
    """Check that something listens where a PostgreSQL URL points, for up to ``wait`` seconds
    (saying once, on stderr, that it waits), instead of letting the store retry for 15 s with a
    warning per attempt. ``serve`` and ``worker`` wait (they may start with their database);
    one-shot commands do not.

    Raises:
        DbProblem: nothing listens there (refused, timed out, no such socket).
    """
    if urlsplit(url).scheme not in {"postgres", "postgresql"}:
        return
    address = _postgres_address(url)
    if address is None:
        return
    where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            _connect(address, timeout)
            return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if time.monotonic() + 0.5 > deadline:
                raise DbProblem(
                    f"cannot reach PostgreSQL at {where} ({reason}) for --db {redact(url)!r}; "
                    f"is it running? --db takes {FORMS}"
                ) from None
        if not said:
            logger.warning("waiting up to %g s for PostgreSQL at %s (%s)", wait, where, reason)
            said = True
        time.sleep(0.5)


def require_db(url: str) -> None:
    """For commands that only read: a SQLite database must be there already.

    Raises:
        UsageProblem: no file at the path a ``sqlite://`` URL names.
    """
    if urlsplit(url).scheme == "sqlite":
        path = sqlite_file(url)
        if not path.is_file():
            raise UsageProblem(f"no database at {path} (--db {url})")


@asynccontextmanager
async def open_db(url: str, *, read_only: bool = False) -> AsyncIterator[Store]:
    """The opened store at ``url``. With ``read_only``, a SQLite file that does not exist is an
    error instead of a new, empty database (and its folder).

    Raises:
        UsageProblem: no database at the path (``read_only``).
        DbProblem: the store cannot be opened (unreachable, refused, not a database...).
    """
    if read_only:
        require_db(url)
    try:
        store = open_store(url)
        await store.open()
    except BackendUnavailable as exc:
        raise UsageProblem(str(exc)) from None
    except Exception as exc:
        logger.debug("opening %s failed", redact(url), exc_info=True)
        raise DbProblem(
            f"cannot open --db {redact(url)!r}: {type(exc).__name__}: {exc}".rstrip(": ")
        ) from None
    try:
        yield store
    finally:
        await store.aclose()
