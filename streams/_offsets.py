"""Offsets: opaque, fixed-width strings that sort lexicographically.

An offset names a position *between* messages: reading from offset ``o`` returns the messages
after it. Internally it is the number of messages before that position, written as
``0000000000000000_{n:016d}``; the leading field is reserved (always zero today) so the format can
grow a segment or epoch without breaking order. ``-1`` (the start) and ``now`` (the tail) are
sentinels that a store never mints.
"""

from __future__ import annotations

import re

from ._errors import BadOffset

__all__ = ["START", "TAIL", "format_offset", "parse_offset"]

START = "-1"
TAIL = "now"
_WIDTH = 16
_PATTERN = re.compile(r"(\d{16})_(\d{16})")  # fullmatch: no trailing newline
_PREFIX = "0" * _WIDTH + "_"


def format_offset(position: int) -> str:
    """Return the offset string for ``position`` (messages before it)."""
    return f"{_PREFIX}{position:016d}"


def parse_offset(offset: str, *, path: str = "") -> int | None:
    """Return the position an offset names; ``None`` for ``now`` (the tail).

    Raises:
        BadOffset: when ``offset`` is neither a sentinel nor a well-formed offset.
    """
    if offset == START:
        return 0
    if offset == TAIL:
        return None
    match = _PATTERN.fullmatch(offset)
    if match is None or match.group(1) != "0" * _WIDTH:
        raise BadOffset(f"malformed offset {offset!r}", path=path)
    return int(match.group(2))
