"""A durable entity runtime over event streams (see DESIGN.md).

Define entity types on a :class:`Registry`, run them with a :class:`Runtime` (embedded, or
through the ``entities`` CLI's worker and server), and send them messages by URL.
"""

from __future__ import annotations

from ._approvals import Approval as Approval
from ._awaiting import CallResult as CallResult
from ._budgets import TokenBudget as TokenBudget
from ._check import CheckFinding as CheckFinding
from ._check import CheckReport as CheckReport
from ._check import check_deploy as check_deploy
from ._clock import Clock as Clock
from ._clock import SystemClock as SystemClock
from ._clock import VirtualClock as VirtualClock
from ._collections import Collection as Collection
from ._collections import CollectionDef as CollectionDef
from ._collections import collection as collection
from ._compaction import CompactionReport as CompactionReport
from ._context import EntityHandle as EntityHandle
from ._context import HandlerContext as HandlerContext
from ._errors import AgentError as AgentError
from ._errors import ApprovalNotFound as ApprovalNotFound
from ._errors import ApprovalNotPending as ApprovalNotPending
from ._errors import BudgetExceeded as BudgetExceeded
from ._errors import ContextError as ContextError
from ._errors import DeadLetterNotFound as DeadLetterNotFound
from ._errors import DefinitionError as DefinitionError
from ._errors import DuplicateEntity as DuplicateEntity
from ._errors import EntitiesError as EntitiesError
from ._errors import EntityNotFound as EntityNotFound
from ._errors import EntityStopped as EntityStopped
from ._errors import IdempotencyKeyReused as IdempotencyKeyReused
from ._errors import InvalidDecision as InvalidDecision
from ._errors import InvalidEntityURL as InvalidEntityURL
from ._errors import InvalidForkPoint as InvalidForkPoint
from ._errors import InvalidIdempotencyKey as InvalidIdempotencyKey
from ._errors import InvalidSendMode as InvalidSendMode
from ._errors import InvalidSignal as InvalidSignal
from ._errors import JournalCompacted as JournalCompacted
from ._errors import LeaseLost as LeaseLost
from ._errors import MessageNotQueued as MessageNotQueued
from ._errors import MigrationFailed as MigrationFailed
from ._errors import ModelError as ModelError
from ._errors import ProcessFailed as ProcessFailed
from ._errors import ProcessTimeout as ProcessTimeout
from ._errors import ReplayDivergence as ReplayDivergence
from ._errors import SchemaValidationFailed as SchemaValidationFailed
from ._errors import UnknownEntityType as UnknownEntityType
from ._errors import WakeTimeout as WakeTimeout
from ._manifest import ChildEntry as ChildEntry
from ._manifest import ContextEntry as ContextEntry
from ._manifest import EffectEntry as EffectEntry
from ._manifest import ManifestEntry as ManifestEntry
from ._manifest import ScheduleEntry as ScheduleEntry
from ._manifest import SharedStateEntry as SharedStateEntry
from ._manifest import SourceEntry as SourceEntry
from ._observe import SharedState as SharedState
from ._observe import Source as Source
from ._observe import Wake as Wake
from ._observe import cron as cron
from ._observe import db as db
from ._observe import entities as entities
from ._observe import entity as entity
from ._pipeline.affinity import WorkerInfo as WorkerInfo
from ._records import DeadLetter as DeadLetter
from ._records import EntityInfo as EntityInfo
from ._records import SendReceipt as SendReceipt
from ._registry import EntityType as EntityType
from ._registry import Registry as Registry
from ._replay import Divergence as Divergence
from ._replay import ReplayReport as ReplayReport
from ._replay import WakeReplay as WakeReplay
from ._retention import Retention as Retention
from ._runs import RunHandle as RunHandle
from ._runtime import Runtime as Runtime
from ._signals import Signal as Signal
from ._urls import EntityURL as EntityURL
from ._urls import parse_url as parse_url
from ._wake import InboxMessage as InboxMessage
from ._wake import WakeEvent as WakeEvent
from ._worker import Worker as Worker

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "Approval",
    "ApprovalNotFound",
    "ApprovalNotPending",
    "BudgetExceeded",
    "CallResult",
    "CheckFinding",
    "CheckReport",
    "ChildEntry",
    "Clock",
    "Collection",
    "CollectionDef",
    "CompactionReport",
    "ContextEntry",
    "ContextError",
    "DeadLetter",
    "DeadLetterNotFound",
    "DefinitionError",
    "Divergence",
    "DuplicateEntity",
    "EffectEntry",
    "EntitiesError",
    "EntityHandle",
    "EntityInfo",
    "EntityNotFound",
    "EntityStopped",
    "EntityType",
    "EntityURL",
    "HandlerContext",
    "IdempotencyKeyReused",
    "InboxMessage",
    "InvalidDecision",
    "InvalidEntityURL",
    "InvalidForkPoint",
    "InvalidIdempotencyKey",
    "InvalidSendMode",
    "InvalidSignal",
    "JournalCompacted",
    "LeaseLost",
    "ManifestEntry",
    "MessageNotQueued",
    "MigrationFailed",
    "ModelError",
    "ProcessFailed",
    "ProcessTimeout",
    "Registry",
    "ReplayDivergence",
    "ReplayReport",
    "Retention",
    "RunHandle",
    "Runtime",
    "ScheduleEntry",
    "SchemaValidationFailed",
    "SendReceipt",
    "SharedState",
    "SharedStateEntry",
    "Signal",
    "Source",
    "SourceEntry",
    "SystemClock",
    "TokenBudget",
    "UnknownEntityType",
    "VirtualClock",
    "Wake",
    "WakeEvent",
    "WakeReplay",
    "WakeTimeout",
    "Worker",
    "WorkerInfo",
    "check_deploy",
    "collection",
    "cron",
    "db",
    "entities",
    "entity",
    "parse_url",
]
