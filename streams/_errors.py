"""Errors raised by the ``streams`` package.

The hierarchy::

    StreamsError                       base of everything raised here
    ├── StreamNotFound                 no such stream (or it expired)
    ├── StreamGone                     the stream was deleted but forks keep it (410)
    ├── OffsetGone                     a read asked for data removed by truncation (410)
    ├── StreamForked                   removing data that forks of the stream still read (409)
    ├── StreamExists                   create with a different configuration (409)
    ├── StreamClosed                   append to a closed stream (409)
    ├── ContentTypeMismatch            append body type differs from the stream's (409)
    ├── SequenceConflict               ``Stream-Seq`` did not increase (409)
    ├── ProducerError                  idempotent producer checks
    │   ├── ProducerFenced             epoch older than the current one (403)
    │   ├── ProducerSequenceGap        seq skipped ahead (409)
    │   └── ProducerEpochInvalid       new epoch must start at seq 0 (400)
    ├── BadOffset                      malformed offset (400)
    ├── InvalidRequest                 malformed message, header or argument (400)
    ├── ForkSourceNotFound             fork from a stream that does not exist (404)
    ├── ConditionFailed                a compare-and-set check (KvCheck) did not hold
    ├── StorageFull                    the disk is full; nothing was written (507)
    └── BackendUnavailable             a backend cannot be opened (bad URL, missing driver)

Every error carries the stream ``path`` it relates to (``""`` where none applies).
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BadOffset",
    "ConditionFailed",
    "ContentTypeMismatch",
    "ForkSourceNotFound",
    "InvalidRequest",
    "OffsetGone",
    "ProducerEpochInvalid",
    "ProducerError",
    "ProducerFenced",
    "ProducerSequenceGap",
    "SequenceConflict",
    "StorageFull",
    "StreamClosed",
    "StreamExists",
    "StreamForked",
    "StreamGone",
    "StreamNotFound",
    "StreamsError",
]


class StreamsError(Exception):
    """Base class of every error raised by ``streams``."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path


class StreamNotFound(StreamsError):
    """Raised when a stream does not exist (never created, deleted or expired)."""


class StreamGone(StreamsError):
    """Raised for direct operations on a stream that was deleted while forks still use it."""


class OffsetGone(StreamsError):
    """Raised when a read (or a fork) asks for a position before the stream's earliest retained
    one: that prefix was truncated. ``earliest`` is the offset reads may start from (reading
    from ``-1`` starts there too)."""

    def __init__(self, message: str, *, path: str = "", earliest: str = "") -> None:
        super().__init__(message, path=path)
        self.earliest = earliest


class StreamForked(StreamsError):
    """Raised when removing messages from, or truncating, a stream that forks still read from
    (their history shares its messages); nothing was removed."""


class StreamExists(StreamsError):
    """Raised when creating a stream that exists with a different configuration."""


class StreamClosed(StreamsError):
    """Raised when appending to a closed stream; ``next_offset`` is its tail."""

    def __init__(self, message: str, *, path: str = "", next_offset: str = "") -> None:
        super().__init__(message, path=path)
        self.next_offset = next_offset


class ContentTypeMismatch(StreamsError):
    """Raised when an append's content type differs from the stream's."""


class SequenceConflict(StreamsError):
    """Raised when a ``Stream-Seq`` value does not sort after the previous one."""


class ProducerError(StreamsError):
    """Base of the idempotent-producer validation errors."""


class ProducerFenced(ProducerError):
    """Raised when a producer writes with an epoch older than the current one."""

    def __init__(self, message: str, *, path: str = "", current_epoch: int = 0) -> None:
        super().__init__(message, path=path)
        self.current_epoch = current_epoch


class ProducerSequenceGap(ProducerError):
    """Raised when a producer's seq skips ahead of ``expected``."""

    def __init__(
        self, message: str, *, path: str = "", expected: int = 0, received: int = 0
    ) -> None:
        super().__init__(message, path=path)
        self.expected = expected
        self.received = received


class ProducerEpochInvalid(ProducerError):
    """Raised when a producer starts a new epoch with a seq other than 0."""


class BadOffset(StreamsError):
    """Raised for an offset that is malformed or was never minted by this store."""


class InvalidRequest(StreamsError):
    """Raised for malformed arguments: empty appends, invalid JSON, bad TTLs."""


class ForkSourceNotFound(StreamsError):
    """Raised when forking from a stream that does not exist."""


class ConditionFailed(StreamsError):
    """Raised when a ``KvCheck`` in a commit finds another value; nothing was applied."""

    def __init__(self, message: str, *, path: str = "", namespace: str = "", key: str = "") -> None:
        super().__init__(message, path=path)
        self.namespace = namespace
        self.key = key


class StorageFull(StreamsError):
    """Raised when the store's disk (or quota) is full: the commit was rolled back whole, and
    commits work again once space returns."""


class BackendUnavailable(StreamsError):
    """Raised when a store URL names an unknown scheme or a driver that is not installed."""
