"""Where webhooks may go: resolve the host, refuse internal addresses in every notation.

A webhook URL is an outbound request the server makes on a client's behalf, so without a check
any client could make the server POST to its own loopback, the cloud metadata address or the
private network behind it (SSRF). Text filters miss the many spellings of one address
(``2130706433``, ``0x7f000001``, ``127.1``, ``0177.0.0.1``, ``0``, ``[::ffff:127.0.0.1]``), so the
host is *resolved* (``getaddrinfo`` parses numeric forms exactly as the connection would) and
every resulting address is checked with :mod:`ipaddress`.

The check runs when a subscription is created (``400 WEBHOOK_URL_REJECTED``) and again at every
delivery, where the request is then sent to the address just checked (the ``Host`` header and TLS
server name keep the original host name): a DNS answer that changes after creation (DNS
rebinding) reaches nothing internal. ``allow_private`` (``--allow-private-webhooks``) turns
the check off, for workers on the same host or network; ``allow_loopback``
(``--allow-loopback-webhooks``) lets loopback addresses through and nothing else (what the
protocol's reference server does, and its conformance suite expects).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import anyio

__all__ = ["WebhookTarget", "refused_reason", "resolve_webhook"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where to send one delivery: ``url`` (the host replaced by a checked address, when one
    was resolved), plus the ``Host`` header and TLS server name that keep the original host."""

    url: str
    host_header: str | None = None
    sni_hostname: str | None = None


def refused_reason(address: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why a webhook may not go to ``address`` (``None``: it may)."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return refused_reason(mapped, allow_loopback=allow_loopback)
    if allow_loopback and address.is_loopback:
        return None
    for name in ("loopback", "unspecified", "link_local", "private", "multicast", "reserved"):
        if getattr(address, f"is_{name}"):
            return f"{address} is a {name.replace('_', '-')} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


async def _addresses(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (a literal, in any notation, resolves to itself)."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise LookupError(f"cannot resolve {host!r}: {exc}") from None
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise LookupError(f"{host!r} has no address")
    return found


async def resolve_webhook(
    url: str, *, allow_private: bool, allow_loopback: bool = False
) -> WebhookTarget:
    """Check ``url`` and say where to send it.

    Raises:
        ValueError: not an ``http(s)`` URL with a host, or (unless ``allow_private``) a host
            that does not resolve or resolves to any loopback, private, link-local,
            unspecified, multicast or reserved address (loopback ones pass with
            ``allow_loopback``).
    """
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError("the webhook URL has an invalid port") from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("the webhook URL must be http(s) with a host")
    if allow_private:
        return WebhookTarget(url)
    if parts.username is not None:
        raise ValueError("the webhook URL must not carry credentials")
    try:
        addresses = await _addresses(host, port)
    except LookupError as exc:
        raise ValueError(str(exc)) from None
    for address in addresses:
        reason = refused_reason(address, allow_loopback=allow_loopback)
        if reason is not None:
            raise ValueError(f"the webhook host {host!r} resolves to {reason}")
    chosen = addresses[0]
    literal = f"[{chosen}]" if chosen.version == 6 else str(chosen)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    original = parts.netloc
    return WebhookTarget(pinned, original, host if parts.scheme == "https" else None)
