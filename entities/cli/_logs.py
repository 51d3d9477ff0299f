"""Logging for the ``entities`` command: levels by ``-v``, text or JSON lines (``--log-format``).

Our loggers (``entities``, ``streams``) follow ``-v``: warnings by default, INFO with ``-v``
(one line per wake), DEBUG with ``-vv``. Everything else (asyncio, httpx, asyncpg, aiosqlite,
uvicorn's internals, model SDKs...) stays at WARNING unless ``-vvv``.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import Any

import orjson

__all__ = ["JsonFormatter", "adopt_uvicorn_loggers", "json_logs", "setup_logging"]

OURS = ("entities", "streams")
HANDLER_NAME = "entities.cli"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# uvicorn configures these itself (handlers and levels) when its server is created
UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

# the attributes every LogRecord has: anything else came in through ``extra=``
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, the fields given with ``extra=``, and ``exc_info`` as text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class _AccessFields(logging.Filter):
    """Adds ``client``, ``method``, ``path`` and ``status`` to uvicorn's access records (their
    message stays uvicorn's ``client - "METHOD path HTTP/v" status``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            record.client, record.method, record.path, _, record.status = args
        return True


_state = {"json": False, "verbose": 0}


def json_logs() -> bool:
    """Whether ``--log-format json`` is in effect."""
    return bool(_state["json"])


def setup_logging(verbose: int, log_format: str) -> None:
    """One stderr handler on the root logger, in ``log_format`` (``text`` or ``json``), and the
    levels ``verbose`` (the count of ``-v``) asks for."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in root.handlers[:]:
        if old.get_name() == HANDLER_NAME:  # ours, from an earlier call (tests run several)
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)
    ours = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    for name in OURS:
        logging.getLogger(name).setLevel(ours)
    logging.getLogger("entities.cli").setLevel(logging.INFO)  # the banner, in JSON mode
    _state["json"] = log_format == "json"
    _state["verbose"] = verbose


def adopt_uvicorn_loggers(*, access_log: bool) -> None:
    """Route uvicorn's loggers through our handler and levels (uvicorn installs its own handlers
    as its server is created): its access log (one INFO line per request) only when asked
    for, its other messages at WARNING unless ``-vvv``."""
    verbose = int(_state["verbose"])
    for name in UVICORN:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    if access_log and not any(isinstance(f, _AccessFields) for f in access.filters):
        access.addFilter(_AccessFields())
