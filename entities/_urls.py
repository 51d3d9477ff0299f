"""Entity URLs: ``/{type}/{id}``; the entity's stream is ``{type}/{id}/main``."""

from __future__ import annotations

import re
from typing import NamedTuple

from ._errors import InvalidEntityURL

__all__ = ["EntityURL", "parse_url"]

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$")


class EntityURL(NamedTuple):
    """A parsed entity URL."""

    type: str
    id: str

    @property
    def url(self) -> str:
        return f"/{self.type}/{self.id}"

    @property
    def stream(self) -> str:
        return f"{self.type}/{self.id}/main"

    def __str__(self) -> str:
        return self.url


def check_segment(value: str, what: str) -> str:
    """Return ``value`` if it is a valid type or id segment.

    Raises:
        InvalidEntityURL: empty, too long, or with characters other than ``A-Za-z0-9._~-``.
    """
    if not _SEGMENT.match(value):
        raise InvalidEntityURL(
            f"invalid entity {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ ~ -"
        )
    return value


def parse_url(url: str) -> EntityURL:
    """Parse ``/type/id`` (a leading slash is optional).

    Raises:
        InvalidEntityURL: the URL is not two valid segments.
    """
    parts = url.strip("/").split("/")
    if len(parts) != 2:
        raise InvalidEntityURL(f"entity URLs look like /type/id, got {url!r}")
    return EntityURL(check_segment(parts[0], "type"), check_segment(parts[1], "id"))
