"""Entity URLs: ``/{type}/{id}``; the entity's stream is ``{type}/{id}/main``."""

from __future__ import annotations

import functools
import re

from ._errors import InvalidEntityURL

__all__ = ["EntityURL", "parse_url"]

# The whole segment must match (``fullmatch``): ``$`` alone would also accept a trailing newline,
# and ``/counter/victim%0A`` would then name (and tag) ``/counter/victim``'s neighbour. The
# OpenAPI document anchors the same pattern (JSON Schema's ``$`` means the end of the string).
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")
SEGMENT_PATTERN = f"^{_SEGMENT.pattern}$"


class EntityURL:
    """A parsed entity URL: ``type``, ``id``, and the ``url`` (``/type/id``) and ``stream``
    (``type/id/main``) they make, computed once (they are read many times per wake)."""

    __slots__ = ("id", "stream", "type", "url")

    type: str
    id: str
    url: str
    stream: str

    def __init__(self, type: str, id: str) -> None:
        set_ = object.__setattr__
        set_(self, "type", type)
        set_(self, "id", id)
        set_(self, "url", f"/{type}/{id}")
        set_(self, "stream", f"{type}/{id}/main")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"EntityURL is immutable (cannot set {name!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntityURL) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __repr__(self) -> str:
        return f"EntityURL(type={self.type!r}, id={self.id!r})"

    def __str__(self) -> str:
        return self.url


def check_segment(value: str, what: str) -> str:
    """Return ``value`` if it is a valid type or id segment: 1-128 characters from
    ``A-Z a-z 0-9 . _ ~ -``, the first a letter or digit, matched in full (no trailing newline).

    Raises:
        InvalidEntityURL: empty, too long, or with characters other than ``A-Za-z0-9._~-``.
    """
    if not _SEGMENT.fullmatch(value):
        raise InvalidEntityURL(
            f"invalid entity {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ ~ - "
            "(starting with a letter or digit)"
        )
    return value


@functools.lru_cache(maxsize=4096)
def parse_url(url: str) -> EntityURL:
    """Parse ``/type/id`` (a leading slash is optional). Results are cached (a wake parses the
    same few URLs several times); an :class:`EntityURL` is immutable.

    Raises:
        InvalidEntityURL: the URL is not two valid segments.
    """
    parts = url.strip("/").split("/")
    if len(parts) != 2:
        raise InvalidEntityURL(f"entity URLs look like /type/id, got {url!r}")
    return EntityURL(check_segment(parts[0], "type"), check_segment(parts[1], "id"))
