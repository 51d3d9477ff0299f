"""Protocol details shared by the handlers: header names, strict parsers, cursors, errors.

Every parser raises :class:`Problem` (a 4xx with a clear message) for malformed input, before
anything touches the store, so a bad request changes nothing.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from .. import (
    BadOffset,
    ConditionFailed,
    ContentTypeMismatch,
    ForkSourceNotFound,
    InvalidRequest,
    OffsetGone,
    Producer,
    ProducerEpochInvalid,
    ProducerFenced,
    ProducerSequenceGap,
    SequenceConflict,
    StorageFull,
    StreamClosed,
    StreamExists,
    StreamForked,
    StreamGone,
    StreamNotFound,
    StreamsError,
)

__all__ = [
    "NEXT_OFFSET",
    "Problem",
    "from_store_error",
    "next_cursor",
    "parse_closed",
    "parse_content_type",
    "parse_cursor",
    "parse_expires_at",
    "parse_offset_value",
    "parse_producer",
    "parse_stream_seq",
    "parse_sub_offset",
    "parse_ttl",
]

NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CLOSED = "Stream-Closed"
CURSOR = "Stream-Cursor"

_OFFSET = re.compile(r"\d{16}_\d{16}")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
_MAX_SAFE_INTEGER = 2**53 - 1
_MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
_MAX_TOKEN = 256
# Cursor intervals: 20 s buckets since 2024-10-09T00:00:00Z.
_CURSOR_EPOCH = datetime(2024, 10, 9, tzinfo=UTC).timestamp()
_CURSOR_INTERVAL = 20.0


@dataclass(slots=True)
class Problem(Exception):
    """An error answer: status, a stable code, a human message and extra headers."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)  # more fields of the error object

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> bytes:
        return orjson.dumps({"error": {"code": self.code, "message": self.message, **self.extra}})


def bad_request(message: str, code: str = "BAD_REQUEST") -> Problem:
    return Problem(400, code, message)


def _printable(value: str) -> bool:
    return all(" " <= ch <= "~" for ch in value)


def parse_offset_value(raw: str, *, what: str = "offset") -> str:
    """Validate an offset from a query or header: ``-1``, ``now`` or one this server minted."""
    if raw in ("-1", "now") or _OFFSET.fullmatch(raw):
        return raw
    raise Problem(400, "BAD_OFFSET", f"malformed {what} {raw[:80]!r}")


def parse_ttl(raw: str | None) -> int | None:
    """``Stream-TTL``: plain decimal seconds (no sign, no leading zeros, no exponent)."""
    if raw is None:
        return None
    if not _DECIMAL.fullmatch(raw) or int(raw) > _MAX_TTL_SECONDS:
        raise bad_request(f"Stream-TTL must be a plain non-negative integer, got {raw[:40]!r}")
    return int(raw)


def parse_expires_at(raw: str | None) -> float | None:
    """``Stream-Expires-At``: an RFC 3339 timestamp with a time zone."""
    if raw is None:
        return None
    if not _RFC3339.fullmatch(raw):
        raise bad_request(f"Stream-Expires-At must be an RFC 3339 timestamp, got {raw[:40]!r}")
    text = raw.replace("z", "Z").replace("t", "T")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise bad_request(f"Stream-Expires-At is not a valid date: {raw[:40]!r}") from None


def format_expires_at(value: float) -> str:
    stamp = datetime.fromtimestamp(value, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def parse_closed(raw: str | None) -> bool:
    """``Stream-Closed`` counts only when it is ``true`` (any case); other values are ignored."""
    return raw is not None and raw.strip().lower() == "true"


def parse_content_type(raw: str | None) -> str | None:
    """A ``Content-Type`` value as given, after checking it names a media type."""
    if raw is None:
        return None
    value = raw.strip()
    if not value:
        return None
    if not _printable(value) or len(value) > _MAX_TOKEN:
        raise bad_request("Content-Type is malformed")
    if not _MEDIA_TYPE.fullmatch(value.split(";", 1)[0].strip()):
        raise bad_request(f"Content-Type {value[:60]!r} is not a media type")
    return value


def parse_stream_seq(raw: str | None) -> str | None:
    """``Stream-Seq``: an opaque, non-empty printable token."""
    if raw is None:
        return None
    if not raw or len(raw) > _MAX_TOKEN or not _printable(raw):
        raise bad_request("Stream-Seq must be 1-256 printable characters")
    return raw


def _safe_integer(name: str, raw: str) -> int:
    if not _DECIMAL.fullmatch(raw) or int(raw) > _MAX_SAFE_INTEGER:
        raise bad_request(f"{name} must be an integer from 0 to 2^53-1, got {raw[:40]!r}")
    return int(raw)


def parse_producer(pid: str | None, epoch: str | None, seq: str | None) -> Producer | None:
    """``Producer-Id``/``-Epoch``/``-Seq``: all three or none."""
    given = [value is not None for value in (pid, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise bad_request("Producer-Id, Producer-Epoch and Producer-Seq must be sent together")
    assert pid is not None and epoch is not None and seq is not None
    if not pid or len(pid) > _MAX_TOKEN or not _printable(pid):
        raise bad_request("Producer-Id must be 1-256 printable characters")
    return Producer(pid, _safe_integer("Producer-Epoch", epoch), _safe_integer("Producer-Seq", seq))


def parse_sub_offset(raw: str | None) -> int:
    """``Stream-Fork-Sub-Offset``: a plain non-negative integer."""
    if raw is None:
        return 0
    return _safe_integer("Stream-Fork-Sub-Offset", raw)


def parse_cursor(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not _DECIMAL.fullmatch(raw) or len(raw) > 18:
        raise bad_request(f"cursor must be a decimal integer, got {raw[:40]!r}")
    return int(raw)


def next_cursor(client: int | None, now: float | None = None) -> str:
    """The ``Stream-Cursor`` to send: the current 20 s interval, or strictly more than the
    client's cursor when that is not behind (with 1-3600 s of jitter, so caches split)."""
    current = math.floor(((time.time() if now is None else now) - _CURSOR_EPOCH) / _CURSOR_INTERVAL)
    if client is not None and client >= current:
        jitter = math.ceil(random.uniform(1, 3600) / _CURSOR_INTERVAL)
        return str(client + max(jitter, 1))
    return str(current)


def from_store_error(exc: StreamsError, *, creating: bool = False) -> Problem:
    """Map a store error to its HTTP answer (``creating``: the request was a PUT)."""
    message = exc.message
    if isinstance(exc, StreamNotFound):
        return Problem(404, "STREAM_NOT_FOUND", message)
    if isinstance(exc, ForkSourceNotFound):
        return Problem(404, "FORK_SOURCE_NOT_FOUND", message)
    if isinstance(exc, StreamGone):
        if creating:  # a soft-deleted path (or fork source) blocks creation: a conflict
            return Problem(409, "STREAM_DELETED", message)
        return Problem(410, "STREAM_GONE", message)
    if isinstance(exc, OffsetGone):  # "410 before retention"
        return Problem(410, "OFFSET_GONE", message, {"Stream-Earliest-Offset": exc.earliest})
    if isinstance(exc, StreamForked):
        return Problem(409, "STREAM_FORKED", message)
    if isinstance(exc, StreamClosed):
        headers = {CLOSED: "true"}
        if exc.next_offset:
            headers[NEXT_OFFSET] = exc.next_offset
        return Problem(409, "STREAM_CLOSED", message, headers)
    if isinstance(exc, StreamExists):
        return Problem(409, "STREAM_EXISTS", message)
    if isinstance(exc, ContentTypeMismatch):
        return Problem(409, "CONTENT_TYPE_MISMATCH", message)
    if isinstance(exc, SequenceConflict):
        return Problem(409, "SEQUENCE_CONFLICT", message)
    if isinstance(exc, ProducerFenced):
        return Problem(403, "PRODUCER_FENCED", message, {"Producer-Epoch": str(exc.current_epoch)})
    if isinstance(exc, ProducerSequenceGap):
        headers = {
            "Producer-Expected-Seq": str(exc.expected),
            "Producer-Received-Seq": str(exc.received),
        }
        return Problem(409, "PRODUCER_SEQUENCE_GAP", message, headers)
    if isinstance(exc, ProducerEpochInvalid):
        return Problem(400, "PRODUCER_EPOCH_INVALID", message)
    if isinstance(exc, BadOffset):
        return Problem(400, "BAD_OFFSET", message)
    if isinstance(exc, InvalidRequest):
        return Problem(400, "BAD_REQUEST", message)
    if isinstance(exc, ConditionFailed):
        return Problem(409, "CONFLICT", message)
    if isinstance(exc, StorageFull):
        return Problem(507, "INSUFFICIENT_STORAGE", message)
    return Problem(500, "INTERNAL", "the store failed")
