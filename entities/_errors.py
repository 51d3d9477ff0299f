"""Errors raised by the ``entities`` package.

The hierarchy::

    EntitiesError                      base of everything raised here (``url``: the entity, if any)
    ├── DefinitionError                a bad ``registry.define`` call (duplicate name, bad schema)
    ├── UnknownEntityType              no type of that name is registered (HTTP 404)
    ├── InvalidEntityURL               not of the form ``/{type}/{id}`` (HTTP 400)
    ├── EntityNotFound                 no entity at that URL (HTTP 404)
    ├── DuplicateEntity                spawn of a URL that exists (HTTP 409 DUPLICATE_URL)
    ├── InvalidForkPoint               a fork at an offset the source does not have (HTTP 422)
    ├── InvalidSendMode                a send mode that is not queued, steer or interrupt (HTTP 422)
    ├── InvalidSignal                  a signal that is not pause, resume or interrupt (HTTP 422)
    ├── MessageNotQueued               cancel or edit of a message a wake took already (HTTP 409)
    ├── ApprovalNotFound               no approval of that id at that entity (HTTP 404)
    ├── ApprovalNotPending             a decision on an approval decided already (HTTP 409)
    ├── InvalidDecision                a decision that is not approve or deny (HTTP 422)
    ├── SchemaValidationFailed         args or a message fail their schema (HTTP 422)
    ├── EntityStopped                  the entity was killed and takes no more messages (HTTP 409)
    ├── ContextError                   misuse of the HandlerContext (e.g. writing a bad row)
    ├── MigrationFailed                a stored row cannot be upgraded to its collection's version
    ├── LeaseLost                      a wake's write was fenced: another worker owns the entity
    ├── WakeTimeout                    a wake ran past its type's ``wake_timeout`` and was cancelled
    ├── DeadLetterNotFound             no dead letter with that id (HTTP 404)
    ├── IdempotencyKeyReused           an idempotency key sent again with another request (HTTP 422)
    ├── InvalidIdempotencyKey          not 1-256 printable ASCII characters (HTTP 422)
    ├── ReplayDivergence               a replayed wake did something other than what was recorded
    ├── JournalCompacted               replay of a wake whose journal or history compaction removed
    ├── ModelError                     a model call failed or cannot be made (agents)
    ├── BudgetExceeded                 an agent's token budget for the day is used up
    └── ProcessFailed                  a subprocess agent's turn failed (exit status, stderr tail)
        ├── AgentError                 the agent reported an error meant for the user
        └── ProcessTimeout             the agent ran past its timeout and was stopped

Each error has a machine-readable ``code`` used in HTTP answers and an HTTP ``status``; errors
about one entity carry its ``url`` (``None`` where none applies), as ``streams`` errors carry
their stream's ``path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._turns import CompletedTurn, TurnResult

__all__ = [
    "AgentError",
    "ApprovalNotFound",
    "ApprovalNotPending",
    "BudgetExceeded",
    "ContextError",
    "DeadLetterNotFound",
    "DefinitionError",
    "DuplicateEntity",
    "EntitiesError",
    "EntityNotFound",
    "EntityStopped",
    "IdempotencyKeyReused",
    "InvalidDecision",
    "InvalidEntityURL",
    "InvalidForkPoint",
    "InvalidIdempotencyKey",
    "InvalidSendMode",
    "InvalidSignal",
    "JournalCompacted",
    "LeaseLost",
    "MessageNotQueued",
    "MigrationFailed",
    "ModelError",
    "ProcessFailed",
    "ProcessTimeout",
    "ReplayDivergence",
    "SchemaValidationFailed",
    "UnknownEntityType",
    "WakeTimeout",
]


class EntitiesError(Exception):
    """Base class of every error raised by ``entities``."""

    code = "ENTITIES_ERROR"
    status = 500

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = url


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


class InvalidForkPoint(EntitiesError):
    """Raised when a fork names a point the source does not have: a malformed offset, one
    beyond its tail, or ``latest_completed_run`` of an entity with no completed run."""

    code = "INVALID_FORK_POINT"
    status = 422


class InvalidSendMode(EntitiesError):
    """Raised for a send mode that is not ``queued``, ``steer`` or ``interrupt``."""

    code = "INVALID_SEND_MODE"
    status = 422


class InvalidSignal(EntitiesError):
    """Raised for a signal that is not ``pause``, ``resume`` or ``interrupt``."""

    code = "INVALID_SIGNAL"
    status = 422


class MessageNotQueued(EntitiesError):
    """Raised when cancelling or editing a message that is not queued: a wake took it
    already, it was cancelled, or it was never sent."""

    code = "MESSAGE_NOT_QUEUED"
    status = 409


class ApprovalNotFound(EntitiesError):
    """Raised when deciding an approval that does not exist at the entity."""

    code = "APPROVAL_NOT_FOUND"
    status = 404


class ApprovalNotPending(EntitiesError):
    """Raised when deciding an approval that was decided already."""

    code = "APPROVAL_NOT_PENDING"
    status = 409


class InvalidDecision(EntitiesError):
    """Raised for a decision on an approval that is neither ``approve`` nor ``deny``."""

    code = "INVALID_DECISION"
    status = 422


class SchemaValidationFailed(EntitiesError):
    """Raised when spawn args or an inbox message fail the type's pydantic schema
    (``errors``: pydantic's error list, as JSON-ready dicts)."""

    code = "SCHEMA_VALIDATION_FAILED"
    status = 422

    def __init__(
        self, message: str, errors: list[Any] | None = None, *, url: str | None = None
    ) -> None:
        super().__init__(message, url=url)
        self.errors = errors or []


class EntityStopped(EntitiesError):
    """Raised when sending to an entity that was killed."""

    code = "ENTITY_STOPPED"
    status = 409


class ContextError(EntitiesError):
    """Raised for misuse of a HandlerContext (unknown collection, row of the wrong model...)."""

    code = "CONTEXT_ERROR"
    status = 400


class MigrationFailed(EntitiesError):
    """Raised when reading a stored row of a versioned collection whose migration to the
    current version raises (or that was written by a newer version). Inside a wake it fails
    the wake like any handler error: nothing is lost, and the wake succeeds once the migration
    is fixed. The message names the collection, the row's key and the versions."""

    code = "MIGRATION_FAILED"
    status = 500


class LeaseLost(EntitiesError):
    """Raised inside a wake by a write (a journaled step, live output) once the wake's lease
    was taken over (it expired, or the entity was killed). The wake is cancelled at its next
    await and nothing it buffered is committed, so catching this in handler code changes
    nothing."""

    code = "LEASE_LOST"
    status = 409


class WakeTimeout(EntitiesError):
    """Recorded as the error of a wake whose handler ran past its ``wake_timeout``: the handler
    was cancelled and the attempt failed (retried, then dead-lettered, like any failure)."""

    code = "WAKE_TIMEOUT"
    status = 504


class DeadLetterNotFound(EntitiesError):
    """Raised when retrying or discarding a dead letter that does not exist (any more)."""

    code = "DEAD_LETTER_NOT_FOUND"
    status = 404


class IdempotencyKeyReused(EntitiesError):
    """Raised when an idempotency key comes again with a different request (another payload,
    type or target): the key names one request, whose answer it keeps."""

    code = "IDEMPOTENCY_KEY_REUSED"
    status = 422


class InvalidIdempotencyKey(EntitiesError):
    """Raised for an idempotency key that is empty, longer than 256 characters or not printable
    ASCII."""

    code = "INVALID_IDEMPOTENCY_KEY"
    status = 422


class ReplayDivergence(EntitiesError):
    """Raised (or reported) when a replayed wake diverges from its recorded journal."""

    code = "REPLAY_DIVERGENCE"
    status = 409


class JournalCompacted(EntitiesError):
    """Raised when replaying a wake that compaction put out of reach: its journal is older than
    its type's replay window (``Retention.journal_window``), or the history before it was
    truncated (``Retention.keep_for``)."""

    code = "JOURNAL_COMPACTED"
    status = 410


class ModelError(EntitiesError):
    """Raised by model clients: a failed or refused call, a missing key or SDK, or a
    conversation that cannot be sent. The agent loop turns it into a failed run result."""

    code = "MODEL_ERROR"
    status = 502


class BudgetExceeded(EntitiesError):
    """A model call was not made: the entity or its type used up its token budget for the day
    (``registry.define(..., token_budget=...)``). The agent loop turns it into a failed run
    (``finish_reason="budget"``) whose error is this message."""

    code = "BUDGET_EXCEEDED"
    status = 429


class ProcessFailed(EntitiesError):
    """A subprocess agent's turn failed: it could not start, or exited non-zero without an
    error line (``result.stderr_tail`` says why). The run is recorded as failed."""

    code = "PROCESS_FAILED"

    def __init__(
        self,
        message: str,
        result: TurnResult,
        *,
        message_key: str | None = None,
        completed: Sequence[CompletedTurn] = (),
        url: str | None = None,
    ) -> None:
        super().__init__(message, url=url)
        self.result = result
        self.message_key = message_key
        self.completed = list(completed)  # earlier turns of the same wake that succeeded


class AgentError(ProcessFailed):
    """The agent reported an error for the user (``AGENT_ERROR:`` or ``{"type": "error"}``).

    ``user_message`` is the agent's text; it becomes the caller's reply (``{"error": ...}``)
    when the wake is given up."""

    code = "AGENT_ERROR"

    @property
    def user_message(self) -> str:
        return self.result.error


class ProcessTimeout(ProcessFailed):
    """The agent ran past ``timeout_s`` and was stopped (SIGTERM, grace, SIGKILL); exit 124."""

    code = "PROCESS_TIMEOUT"
