"""Durable streams: append-only offset logs with live tail, idempotent producers, forks and TTL,
State Protocol change events and their materialisation, over memory, SQLite or PostgreSQL."""

from __future__ import annotations

from ._backends.base import DEFAULT_CONTENT_TYPE as DEFAULT_CONTENT_TYPE
from ._backends.base import Append as Append
from ._backends.base import AppendResult as AppendResult
from ._backends.base import Committed as Committed
from ._backends.base import Create as Create
from ._backends.base import CreateResult as CreateResult
from ._backends.base import Delete as Delete
from ._backends.base import KvCheck as KvCheck
from ._backends.base import KvPut as KvPut
from ._backends.base import Message as Message
from ._backends.base import Notify as Notify
from ._backends.base import Op as Op
from ._backends.base import OpResult as OpResult
from ._backends.base import Producer as Producer
from ._backends.base import ProducerState as ProducerState
from ._backends.base import ReadResult as ReadResult
from ._backends.base import Remove as Remove
from ._backends.base import Store as Store
from ._backends.base import StreamInfo as StreamInfo
from ._backends.base import Touch as Touch
from ._backends.base import Truncate as Truncate
from ._backends.sqlite import sqlite_path as sqlite_path
from ._errors import BackendUnavailable as BackendUnavailable
from ._errors import BadOffset as BadOffset
from ._errors import ConditionFailed as ConditionFailed
from ._errors import ContentTypeMismatch as ContentTypeMismatch
from ._errors import ForkSourceNotFound as ForkSourceNotFound
from ._errors import InvalidRequest as InvalidRequest
from ._errors import OffsetGone as OffsetGone
from ._errors import ProducerEpochInvalid as ProducerEpochInvalid
from ._errors import ProducerError as ProducerError
from ._errors import ProducerFenced as ProducerFenced
from ._errors import ProducerSequenceGap as ProducerSequenceGap
from ._errors import SequenceConflict as SequenceConflict
from ._errors import StorageFull as StorageFull
from ._errors import StreamClosed as StreamClosed
from ._errors import StreamExists as StreamExists
from ._errors import StreamForked as StreamForked
from ._errors import StreamGone as StreamGone
from ._errors import StreamNotFound as StreamNotFound
from ._errors import StreamsError as StreamsError
from ._json import is_json_content_type as is_json_content_type
from ._json import join_json as join_json
from ._json import split_json as split_json
from ._offsets import START as START
from ._offsets import TAIL as TAIL
from ._offsets import format_offset as format_offset
from ._offsets import parse_offset as parse_offset
from ._open import open_store as open_store
from ._state import SNAPSHOT_NAMESPACE as SNAPSHOT_NAMESPACE
from ._state import Materializer as Materializer
from ._state import Operation as Operation
from ._state import change as change
from ._state import control as control
from ._state import decode_event as decode_event
from ._state import encode_event as encode_event
from ._state import materialize as materialize
from ._state import save_snapshot as save_snapshot

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "SNAPSHOT_NAMESPACE",
    "START",
    "TAIL",
    "Append",
    "AppendResult",
    "BackendUnavailable",
    "BadOffset",
    "Committed",
    "ConditionFailed",
    "ContentTypeMismatch",
    "Create",
    "CreateResult",
    "Delete",
    "ForkSourceNotFound",
    "InvalidRequest",
    "KvCheck",
    "KvPut",
    "Materializer",
    "Message",
    "Notify",
    "OffsetGone",
    "Op",
    "OpResult",
    "Operation",
    "Producer",
    "ProducerEpochInvalid",
    "ProducerError",
    "ProducerFenced",
    "ProducerSequenceGap",
    "ProducerState",
    "ReadResult",
    "Remove",
    "SequenceConflict",
    "StorageFull",
    "Store",
    "StreamClosed",
    "StreamExists",
    "StreamForked",
    "StreamGone",
    "StreamInfo",
    "StreamNotFound",
    "StreamsError",
    "Touch",
    "Truncate",
    "change",
    "control",
    "decode_event",
    "encode_event",
    "format_offset",
    "is_json_content_type",
    "join_json",
    "materialize",
    "open_store",
    "parse_offset",
    "save_snapshot",
    "split_json",
    "sqlite_path",
]
