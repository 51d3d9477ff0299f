"""Principals and grants: who may do what to which entities (``entities serve --auth FILE``).

The file (JSON, or TOML when its name ends in ``.toml``)::

    {"principals": {"alice": {"token": "...",
                              "grants": [{"actions": ["spawn", "send", "read"],
                                          "urls": "/counter/*"}]}}}

A token is given as is or as ``sha256:<64 hex digits>`` (the SHA-256 of the token): the server
keeps only digests and compares them in constant time. ``urls`` is a glob over entity URLs
(``/type/id``): ``*`` matches any run of characters but ``/``, ``?`` one character but ``/``,
``**`` any run including ``/``, ``[abc]`` one of those characters; ``*`` or ``**`` alone match
every entity. ``admin`` allows every action on the URLs it covers; the routes that concern no
one entity (types, workers, dead letters, metrics) need ``admin`` on every entity.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ACTIONS",
    "Action",
    "AuthConfig",
    "AuthFileError",
    "Grant",
    "Principal",
    "glob_regex",
    "load_auth",
]

Action = Literal["read", "spawn", "send", "kill", "signal", "approve", "admin"]
ACTIONS: tuple[Action, ...] = ("read", "spawn", "send", "kill", "signal", "approve", "admin")
SENDER_PREFIX = "principal:"  # a principal's sender id: ``principal:alice``
_HASH = re.compile(r"sha256:[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


class AuthFileError(ValueError):
    """An auth file that cannot be read or does not have the expected shape (the message is one
    line naming the file and the bad field)."""


def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of ``pattern`` (see the module's docstring for the rule).

    Raises:
        ValueError: an unclosed ``[``.
    """
    if pattern in ("*", "**"):
        return re.compile(r".*", re.DOTALL)
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                raise ValueError(f"unclosed '[' in {pattern!r}")
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


class Grant(BaseModel):
    """``actions`` allowed on the entities whose URL matches the glob ``urls``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    actions: list[Action] = Field(min_length=1)
    urls: str = Field(min_length=1)

    @field_validator("urls")
    @classmethod
    def _check_glob(cls, value: str) -> str:
        if value not in ("*", "**") and not value.startswith("/"):
            raise ValueError("must be '*' or a glob over entity URLs, starting with '/'")
        glob_regex(value)
        return value

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return glob_regex(self.urls)

    @property
    def everything(self) -> bool:
        """Whether this grant covers every entity URL."""
        return self.urls in ("*", "**", "/**")

    def allows(self, action: Action, url: str | None) -> bool:
        """Whether this grant allows ``action`` on ``url`` (``None``: on no one entity, which
        needs ``admin`` on every entity)."""
        if action not in self.actions and "admin" not in self.actions:
            return False
        if url is None:
            return self.everything and "admin" in self.actions
        return self.regex.fullmatch(url) is not None


class Principal(BaseModel):
    """Someone who holds a token, and what it allows. ``name`` is filled from the file's key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = ""
    token: str = Field(min_length=1, repr=False)
    grants: list[Grant] = Field(default_factory=list)

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: str) -> str:
        if value.startswith("sha256:") and not _HASH.fullmatch(value):
            raise ValueError("a token hash must be 'sha256:' and 64 hex digits")
        if value != value.strip():
            raise ValueError("must not start or end with white space")
        return value

    @cached_property
    def digest(self) -> bytes:
        """The SHA-256 of this principal's token."""
        if _HASH.fullmatch(self.token):
            return bytes.fromhex(self.token.removeprefix("sha256:"))
        return hashlib.sha256(self.token.encode()).digest()

    @property
    def sender(self) -> str:
        """The ``from`` of the messages this principal sends: ``principal:NAME``."""
        return SENDER_PREFIX + self.name

    def allows(self, action: Action, url: str | None) -> bool:
        """Whether any grant allows ``action`` on entity ``url`` (``None``: on the runtime as a
        whole: types, workers, dead letters, metrics; only ``admin`` on ``*`` allows it)."""
        return any(grant.allows(action, url) for grant in self.grants)


class AuthConfig(BaseModel):
    """The principals a server knows, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    principals: dict[str, Principal]

    @model_validator(mode="before")
    @classmethod
    def _name_principals(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("principals"), dict):
            principals = {}
            for name, body in data["principals"].items():
                if isinstance(body, dict):
                    body = {**body, "name": name}
                principals[name] = body
            data = {**data, "principals": principals}
        return data

    @model_validator(mode="after")
    def _check(self) -> AuthConfig:
        if not self.principals:
            raise ValueError("principals: at least one is needed")
        seen: dict[bytes, str] = {}
        for name, principal in self.principals.items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"principals.{name}: a name is 1-128 letters, digits and . _ @ -")
            if principal.digest in seen:
                other = seen[principal.digest]
                raise ValueError(f"principals.{name}.token: the same token as principals.{other}")
            seen[principal.digest] = name
        return self

    @classmethod
    def single_token(cls, token: str) -> AuthConfig:
        """One principal, ``admin``, with ``admin`` on every entity (``entities serve --token``).

        Raises:
            ValueError: an empty token.
        """
        grants = [Grant(actions=["admin"], urls="*")]
        return cls(principals={"admin": Principal(name="admin", token=token, grants=grants)})

    def authenticate(self, token: str) -> Principal | None:
        """The principal holding ``token``, or ``None``. Compares the token's SHA-256 with every
        principal's, in constant time, whichever matches."""
        given = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for principal in self.principals.values():
            if hmac.compare_digest(given, principal.digest):
                found = principal
        return found


def _where(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_auth(path: str | Path) -> AuthConfig:
    """Read an auth file: JSON, or TOML when its name ends in ``.toml``.

    Raises:
        AuthFileError: the file cannot be read, is not JSON/TOML, or has the wrong shape (the
            message names the field).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise AuthFileError(f"{path}: not {kind}: {exc}") from None
    try:
        return AuthConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = [part for part in error["loc"] if part != "name"]
        where = _where(loc)
        if not loc and ": " in message:  # the model's own checks name the field themselves
            raise AuthFileError(f"{path}: {message}") from None
        raise AuthFileError(f"{path}: {where}: {message}") from None
