"""Errors raised by the ``entities`` package.

The hierarchy::

    EntitiesError                      base of everything raised here
    ├── DefinitionError                a bad ``registry.define`` call (duplicate name, bad schema)
    ├── UnknownEntityType              no type of that name is registered (HTTP 404)
    ├── InvalidEntityURL               not of the form ``/{type}/{id}`` (HTTP 400)
    ├── EntityNotFound                 no entity at that URL (HTTP 404)
    ├── DuplicateEntity                spawn of a URL that exists (HTTP 409 DUPLICATE_URL)
    ├── SchemaValidationFailed         args or a message fail their schema (HTTP 422)
    ├── EntityStopped                  the entity was killed and takes no more messages (HTTP 409)
    ├── ContextError                   misuse of the HandlerContext (e.g. writing a bad row)
    ├── LeaseLost                      a wake's commit was fenced: another worker owns the entity
    └── ReplayDivergence               a replayed wake did something other than what was recorded

Each error has a machine-readable ``code`` used in HTTP answers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ContextError",
    "DefinitionError",
    "DuplicateEntity",
    "EntitiesError",
    "EntityNotFound",
    "EntityStopped",
    "InvalidEntityURL",
    "LeaseLost",
    "ReplayDivergence",
    "SchemaValidationFailed",
    "UnknownEntityType",
]


class EntitiesError(Exception):
    """Base class of every error raised by ``entities``."""

    code = "ENTITIES_ERROR"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DefinitionError(EntitiesError):
    """Raised by ``Registry.define`` for a duplicate name or an invalid definition."""

    code = "DEFINITION_ERROR"
    status = 400


class UnknownEntityType(EntitiesError):
    """Raised when a URL or call names an entity type that is not registered."""

    code = "UNKNOWN_ENTITY_TYPE"
    status = 404


class InvalidEntityURL(EntitiesError):
    """Raised for an entity URL that is not ``/{type}/{id}`` with safe segments."""

    code = "INVALID_URL"
    status = 400


class EntityNotFound(EntitiesError):
    """Raised when no entity exists at a URL."""

    code = "ENTITY_NOT_FOUND"
    status = 404


class DuplicateEntity(EntitiesError):
    """Raised when spawning an entity whose URL already exists."""

    code = "DUPLICATE_URL"
    status = 409


class SchemaValidationFailed(EntitiesError):
    """Raised when spawn args or an inbox message fail the type's pydantic schema."""

    code = "SCHEMA_VALIDATION_FAILED"
    status = 422

    def __init__(self, message: str, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class EntityStopped(EntitiesError):
    """Raised when sending to an entity that was killed."""

    code = "ENTITY_STOPPED"
    status = 409


class ContextError(EntitiesError):
    """Raised for misuse of a HandlerContext (unknown collection, row of the wrong model...)."""

    code = "CONTEXT_ERROR"
    status = 400


class LeaseLost(EntitiesError):
    """Raised inside the runtime when a wake's lease was taken over; its effects are dropped."""

    code = "LEASE_LOST"
    status = 409


class ReplayDivergence(EntitiesError):
    """Raised (or reported) when a replayed wake diverges from its recorded journal."""

    code = "REPLAY_DIVERGENCE"
    status = 409
