"""The agentproc wire: what one turn of a subprocess agent takes and produces, and how its
stdout lines read (wire 0.1 prefixes and wire 0.4 JSON events). No I/O here; running the program
is :mod:`entities._process`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel

__all__ = [
    "EXIT_ERROR",
    "EXIT_SUCCESS",
    "EXIT_TIMEOUT",
    "TRUNCATION_MARKER",
    "CompletedTurn",
    "ProcessSession",
    "ProcessSpec",
    "Turn",
    "TurnResult",
    "classify_line",
]

WIRE_01 = "0.1"
WIRE_04 = "0.4"
EXIT_SUCCESS = 0
EXIT_ERROR = 1
EXIT_TIMEOUT = 124
TRUNCATION_MARKER = "\n\n…(truncated)"
STDERR_WINDOW = 8192  # bytes of stderr kept for failure reports
STDERR_TAIL_CHARS = 2000  # characters of it shown in a failure's message
DRAIN_AFTER_EXIT_S = 2.0  # how long to wait for the pipes to drain once the program exited

PREFIX_PARTIAL = "AGENT_PARTIAL:"
PREFIX_SESSION = "AGENT_SESSION:"
PREFIX_ERROR = "AGENT_ERROR:"
_AGENT_VARS = (
    "AGENT_MESSAGE",
    "AGENT_SESSION_ID",
    "AGENT_SESSION_NAME",
    "AGENT_FROM_USER",
    "AGENT_STREAMING",
    "AGENT_PROTOCOL_VERSION",
    "AGENT_IMAGE_URL",
    "AGENT_FILE_URL",
    "AGENT_ATTACHMENTS",
)
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# -- data ---------------------------------------------------------------------------------------


class ProcessSession(BaseModel):
    """A row of a process entity's ``sessions`` collection: the agent's session id per
    session name (``"default"`` unless a message names one)."""

    key: str
    session_id: str
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """How to run the agent program (the bridge-side profile)."""

    command: tuple[str, ...]
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    env_allowlist: frozenset[str] | None = None
    timeout_s: float = 60.0
    kill_grace_s: float = 5.0
    streaming: bool = True
    max_reply_chars: int = 8000


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn's input."""

    message: str
    session_id: str = ""
    session_name: str = "default"
    from_user: str = ""
    attachments: tuple[Mapping[str, Any], ...] = ()
    image_url: str = ""
    file_url: str = ""


@dataclass(slots=True)
class TurnResult:
    """What one run of the program produced (JSON-ready with :meth:`to_json`)."""

    reply: str = ""
    session_id: str = ""
    error: str = ""
    exit_code: int = 0
    timed_out: bool = False
    partials: list[str] = field(default_factory=list)
    truncated: bool = False
    stderr_tail: str = ""
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the turn succeeded (exit 0, no error line, no timeout)."""
        return self.exit_code == EXIT_SUCCESS and not self.error and not self.timed_out

    def to_json(self) -> dict[str, Any]:
        return {
            "reply": self.reply,
            "session_id": self.session_id,
            "error": self.error,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "partials": list(self.partials),
            "truncated": self.truncated,
            "stderr_tail": self.stderr_tail,
            "duration_ms": self.duration_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TurnResult:
        return cls(
            reply=str(data.get("reply", "")),
            session_id=str(data.get("session_id", "")),
            error=str(data.get("error", "")),
            exit_code=int(data.get("exit_code", 0)),
            timed_out=bool(data.get("timed_out", False)),
            partials=[str(p) for p in data.get("partials", [])],
            truncated=bool(data.get("truncated", False)),
            stderr_tail=str(data.get("stderr_tail", "")),
            duration_ms=float(data.get("duration_ms", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class CompletedTurn:
    """A turn that succeeded earlier in a wake that later failed (re-applied by ``on_error``)."""

    message_key: str
    reply: str
    session_name: str
    session_id: str


# -- line classification ------------------------------------------------------------------------


def _decode_value(raw: str) -> str:
    """Wire 0.1 payload: a JSON string is decoded; any other JSON value or bare text is kept."""
    text = raw.strip()
    if not text:
        return ""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def classify_line(line: str) -> tuple[str, str, str | None]:
    """Classify one stdout line as ``(kind, value, session_id)``.

    ``kind`` is ``partial``, ``session``, ``error`` (both wires), ``result`` (0.4) or ``body``
    (0.1 reply text). ``session_id`` is the optional field of a 0.4 event (``None`` if absent
    or empty). A line that is a JSON object whose ``type`` is not one of ``partial``, ``result``
    or ``error`` is body text.
    """
    if line.startswith(PREFIX_PARTIAL):
        return "partial", _decode_value(line[len(PREFIX_PARTIAL) :]), None
    if line.startswith(PREFIX_SESSION):
        return "session", line[len(PREFIX_SESSION) :].strip(), None
    if line.startswith(PREFIX_ERROR):
        return "error", _decode_value(line[len(PREFIX_ERROR) :]), None
    stripped = line.strip()
    if stripped.startswith("{"):
        try:
            obj = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and obj.get("type") in ("partial", "result", "error"):
            kind = str(obj["type"])
            text = obj.get("message" if kind == "error" else "text")
            session = obj.get("session_id")
            return (
                kind,
                text if isinstance(text, str) else "",
                session if isinstance(session, str) and session else None,
            )
    return "body", line, None
