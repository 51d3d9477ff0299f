"""Choosing a backend by URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from ._backends.base import Store
from ._backends.memory import MemoryStore
from ._backends.sqlite import SqliteStore
from ._errors import BackendUnavailable

__all__ = ["open_store"]


def open_store(url: str) -> Store:
    """Return an (unopened) store for ``url``; use it as ``async with open_store(url) as s``.

    ``memory://`` keeps everything in the process; ``sqlite:///relative/file.db`` or
    ``sqlite:////absolute/file.db`` is the embedded default; ``postgresql://...`` needs the
    ``postgres`` extra.

    Raises:
        BackendUnavailable: unknown scheme, or the driver's extra is not installed.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStore(url)
    if scheme == "sqlite":
        return SqliteStore(url)
    if scheme in {"postgres", "postgresql"}:
        try:  # the backend imports asyncpg, an optional dependency
            from ._backends.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise BackendUnavailable(
                "PostgreSQL support needs the 'postgres' extra: "
                f"pip install 'entities-runtime[postgres]' ({exc})"
            ) from None
        return PostgresStore(url)  # type: ignore[no-any-return,unused-ignore]
    raise BackendUnavailable(
        f"unknown store URL scheme {scheme!r} in {url!r}: "
        "use memory://, sqlite:///path or postgresql://"
    )
