"""State migrations: a collection's row version, and upgrading stored rows to the current one.

A collection declared with ``version=N`` (``N > 1``) writes its rows with the reserved key
``"_v": N`` in the row value; a row without it is version 1 (every row written before the
collection had a version). Pydantic fields cannot start with an underscore, so the key never
collides with a model field, and the change event keeps its State Protocol shape for outside
readers (a row is still any JSON object). Collections at version 1 write rows exactly as before.

Rows are upgraded when a wake reads them (lazily, per collection, and only for collections
declaring a version above 1: the wake of an unversioned type does no per-row work), when
:meth:`~entities.Runtime.state_of` reads them, and by ``entities check``. The stream keeps the
rows as written; a row is stored at the current version the next time the handler writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._errors import DefinitionError, MigrationFailed

__all__ = ["VERSION_KEY", "Migrations", "check_chain", "row_version", "stored_row", "upgrade"]

VERSION_KEY = "_v"

Migrations = Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]]


def check_chain(version: int, migrate: Migrations | None) -> dict[int, Any]:
    """The migration chain of a collection at ``version``: one function per from-version,
    ``1`` to ``version - 1``.

    Raises:
        DefinitionError: ``version`` is not a positive int, a from-version is missing (a gap),
            out of range, or its migration is not callable.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DefinitionError(
            f"a collection's version must be an int of at least 1, not {version!r}"
        )
    chain = dict(migrate or {})
    wanted = set(range(1, version))
    extra = sorted(k for k in chain if k not in wanted)
    if extra:
        raise DefinitionError(
            f"migrate has from-versions {extra} outside 1..{version - 1} for a collection at "
            f"version {version}"
        )
    missing = sorted(wanted - set(chain))
    if missing:
        raise DefinitionError(
            f"migrate lacks from-versions {missing}: a collection at version {version} needs a "
            f"migration from each earlier version (1 -> 2 -> ... -> {version})"
        )
    for k, fn in chain.items():
        if not callable(fn):
            raise DefinitionError(f"migrate[{k}] is not callable")
    return chain


def row_version(row: Any) -> int:
    """The version a stored row was written at (``1`` when it carries none)."""
    if isinstance(row, dict):
        v = row.get(VERSION_KEY, 1)
        return v if isinstance(v, int) else 1
    return 1


def stored_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` without its version key (what the model validates)."""
    if VERSION_KEY not in row:
        return row
    return {k: v for k, v in row.items() if k != VERSION_KEY}


def upgrade(
    collection: str,
    key: str,
    row: Any,
    version: int,
    chain: Migrations,
    *,
    url: str | None = None,
) -> Any:
    """``row`` upgraded to ``version`` (with its version key), or ``row`` itself when it is
    current.

    Raises:
        MigrationFailed: a migration raised or returned no dict, or the row was written at a
            version newer than ``version`` (code rolled back past it).
    """
    at = row_version(row)
    if at == version:
        return row
    where = f"row {key!r} of collection {collection!r}" + (f" of {url}" if url else "")
    if at > version:
        raise MigrationFailed(
            f"{where} is at version {at}, newer than the code's version {version}", url=url
        )
    current: Any = stored_row(row)
    while at < version:
        try:
            current = chain[at](dict(current))
        except Exception as exc:
            raise MigrationFailed(
                f"migrating {where} from version {at} to {at + 1} failed: "
                f"{type(exc).__name__}: {exc}",
                url=url,
            ) from exc
        if not isinstance(current, dict):
            raise MigrationFailed(
                f"migrating {where} from version {at} to {at + 1} returned "
                f"{type(current).__name__}, not a dict",
                url=url,
            )
        at += 1
    return {**current, VERSION_KEY: version}
