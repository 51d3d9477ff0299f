"""Typed state collections: their definitions (``collection(Model, primary_key=...)``) and, inside
a wake, the collections themselves, whose reads see the wake's own buffered writes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from streams import Operation

from ._errors import ContextError, DefinitionError
from ._migrations import VERSION_KEY, Migrations, check_chain, stored_row, upgrade

__all__ = [
    "Actions",
    "Backing",
    "Collection",
    "CollectionDef",
    "Collections",
    "Database",
    "collection",
]


@dataclass(frozen=True, slots=True)
class CollectionDef:
    """A user state collection: rows of ``model`` keyed by the field ``primary_key``, at
    ``version`` (rows written at an earlier one are upgraded by ``migrate[from_version]``)."""

    model: type[BaseModel]
    primary_key: str = "key"
    type: str | None = None  # the event type in the stream; default ``state:{name}``
    version: int = 1
    migrate: Migrations = field(default_factory=dict, hash=False, compare=False)

    def event_type(self, name: str) -> str:
        return self.type or f"state:{name}"

    def upgrade(self, name: str, key: str, row: Any, *, url: str | None = None) -> Any:
        """The stored ``row`` at ``key`` upgraded to this collection's version (see
        :func:`~entities._migrations.upgrade`).

        Raises:
            MigrationFailed: a migration raised, or the row is newer than ``version``.
        """
        return upgrade(name, key, row, self.version, self.migrate, url=url)


def collection(
    model: type[BaseModel],
    *,
    primary_key: str = "key",
    type: str | None = None,
    version: int = 1,
    migrate: Migrations | None = None,
) -> CollectionDef:
    """Declare a state collection of pydantic ``model`` rows keyed by ``primary_key``.

    ``version`` (default 1) is the version rows are written at; ``migrate`` maps each earlier
    version ``v`` to a function upgrading a row (a dict, without its version) from ``v`` to
    ``v + 1``. A wake reads every row at ``version``: older rows are upgraded as they are read.

    Raises:
        DefinitionError: ``model`` has no field named ``primary_key``, ``version`` is not a
            positive int, or ``migrate`` does not hold exactly one callable per earlier version.
    """
    if primary_key not in model.model_fields:
        raise DefinitionError(f"{model.__name__} has no field {primary_key!r} to use as key")
    chain = check_chain(version, migrate)
    return CollectionDef(model, primary_key, type, version, chain)


class Backing(Protocol):
    """Where a collection's rows live and where its change events go (an entity's wake context
    or a shared-state handle)."""

    _view: dict[str, dict[str, Any]]

    def _emit(
        self, type_: str, key: str, value: Any, operation: Operation, old: Any = None
    ) -> None: ...


class Collection:
    """One state collection: ``get``, ``to_list``, ``insert``, ``upsert``, ``update``,
    ``delete``."""

    def __init__(self, ctx: Backing, name: str, definition: CollectionDef) -> None:
        self._ctx = ctx
        self.name = name
        self.definition = definition
        self.event_type = definition.event_type(name)
        self._current = definition.version == 1  # rows need no upgrade (checked once per wake)

    def _rows(self) -> dict[str, Any]:
        rows = self._ctx._view.setdefault(self.event_type, {})
        if not self._current:
            self._upgrade(rows)
        return rows

    def _upgrade(self, rows: dict[str, Any]) -> None:
        """Upgrade the rows of an earlier version in place (the view is the wake's own copy).

        Raises:
            MigrationFailed: a migration raised, or a row is newer than the code.
        """
        url = getattr(self._ctx, "entity_url", None)
        for key, row in list(rows.items()):
            upgraded = self.definition.upgrade(self.name, key, row, url=url)
            if upgraded is not row:
                rows[key] = upgraded
        self._current = True

    def _model(self, value: Any) -> BaseModel:
        if self.definition.version > 1:
            value = stored_row(value)
        return self.definition.model.model_validate(value)

    def _coerce(self, row: BaseModel | dict[str, Any]) -> tuple[str, dict[str, Any]]:
        model = self.definition.model
        try:
            obj = row if isinstance(row, model) else model.model_validate(row)
        except ValidationError as exc:
            raise ContextError(
                f"row for {self.name!r} does not match {model.__name__}: {exc}"
            ) from None
        if isinstance(row, BaseModel) and not isinstance(row, model):
            raise ContextError(f"{self.name!r} holds {model.__name__}, not {type(row).__name__}")
        data = obj.model_dump(mode="json")
        if self.definition.version > 1:
            data[VERSION_KEY] = self.definition.version
        key = data.get(self.definition.primary_key)
        if not isinstance(key, str) or not key:
            raise ContextError(
                f"{self.name!r} rows need a non-empty string {self.definition.primary_key!r}"
            )
        return key, data

    def get(self, key: str) -> Any:
        """The row at ``key`` (a model instance), or ``None``."""
        value = self._rows().get(key)
        return None if value is None else self._model(value)

    def to_list(self) -> list[Any]:
        """Every row, in key order."""
        rows = self._rows()
        return [self._model(rows[k]) for k in sorted(rows)]

    def keys(self) -> list[str]:
        return sorted(self._rows())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.to_list())

    def __len__(self) -> int:
        return len(self._rows())

    def __contains__(self, key: object) -> bool:
        return key in self._rows()

    def insert(self, row: BaseModel | dict[str, Any]) -> None:
        """Add a row.

        Raises:
            ContextError: the row does not fit the model, or its key exists (use ``update``).
        """
        key, data = self._coerce(row)
        if key in self._rows():
            raise ContextError(f"{self.name!r} already has a row {key!r}; use update")
        self._rows()[key] = data
        self._ctx._emit(self.event_type, key, data, "insert")

    def upsert(self, row: BaseModel | dict[str, Any]) -> None:
        """Insert or replace a row. Raises as :meth:`insert` for a row that does not fit."""
        key, data = self._coerce(row)
        operation: Operation = "update" if key in self._rows() else "insert"
        old = self._rows().get(key)
        self._rows()[key] = data
        self._ctx._emit(self.event_type, key, data, operation, old)

    def update(self, key: str, updater: Callable[[Any], Any] | BaseModel | dict[str, Any]) -> Any:
        """Replace the row at ``key``: with a new row, or ``updater(current_row)``'s result.

        The updater may return a new row or mutate the model it is given and return ``None``.

        Raises:
            ContextError: no row at ``key``, the result does not fit, or the key changed.
        """
        current = self.get(key)
        if current is None:
            raise ContextError(f"{self.name!r} has no row {key!r} to update")
        if callable(updater) and not isinstance(updater, BaseModel | dict):
            result = updater(current)
            row = current if result is None else result
        else:
            row = updater
        new_key, data = self._coerce(row)
        if new_key != key:
            raise ContextError(f"update of {key!r} may not change its key to {new_key!r}")
        old = self._rows()[key]
        self._rows()[key] = data
        self._ctx._emit(self.event_type, key, data, "update", old)
        return self._model(data)

    def delete(self, key: str) -> None:
        """Remove the row at ``key``.

        Raises:
            ContextError: no row at ``key``.
        """
        rows = self._rows()
        if key not in rows:
            raise ContextError(f"{self.name!r} has no row {key!r} to delete")
        old = rows.pop(key)
        self._ctx._emit(self.event_type, key, None, "delete", old)


class Collections:
    """``ctx.db.collections.<name>`` / ``ctx.state.<name>``."""

    def __init__(self, ctx: Backing, definitions: Mapping[str, CollectionDef]) -> None:
        self._items = {name: Collection(ctx, name, d) for name, d in definitions.items()}

    def __getattr__(self, name: str) -> Collection:
        try:
            return self._items[name]
        except KeyError:
            raise AttributeError(f"no state collection {name!r}") from None

    def __getitem__(self, name: str) -> Collection:
        try:
            return self._items[name]
        except KeyError:
            raise ContextError(f"no state collection {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


class Actions:
    """``ctx.db.actions.<c>_insert(row=...)``, ``<c>_update(key=..., updater=...)``,
    ``<c>_delete(key=...)``, plus a type's custom actions."""

    def __init__(self, collections: Collections, custom: dict[str, Callable[..., Any]]) -> None:
        self._collections = collections
        self._custom = custom

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in self._custom:
            return self._custom[name]
        for suffix in ("_insert", "_upsert", "_update", "_delete"):
            if name.endswith(suffix):
                target = self._collections[name[: -len(suffix)]]
                return getattr(target, suffix[1:])  # type: ignore[no-any-return]
        raise AttributeError(f"no action {name!r}")


class Database:
    """``ctx.db``: ``collections`` to read, ``actions`` to write."""

    def __init__(self, collections: Collections, actions: Actions) -> None:
        self.collections = collections
        self.actions = actions
