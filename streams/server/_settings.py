"""Server settings: one frozen object, validated once."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServerSettings"]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How the Durable Streams HTTP server behaves.

    Attributes:
        base_path: URL prefix the streams are served under (``{base_path}/{stream path}``).
        long_poll_timeout_s: how long a ``live=long-poll`` request waits before ``204``.
        sse_max_duration_s: how long one SSE connection stays open before the server ends it
            (clients reconnect from the last ``streamNextOffset``; lets CDNs collapse requests).
        sse_keepalive_s: idle interval after which an SSE connection gets a comment line.
        max_body_bytes: largest accepted request body; larger ones get ``413``.
        read_max_messages: most messages one GET response (or SSE data event) carries.
        read_max_bytes: about how many payload bytes one GET response carries (at least one
            message is always returned).
        cache_max_age_s: ``max-age`` of cacheable catch-up reads.
        cors_origins: allowed CORS origins; ``("*",)`` allows any.
        max_path_length: longest accepted stream path.
        allow_private_webhooks: let webhooks go to loopback, private, link-local and other
            internal addresses (off: such URLs get ``400 WEBHOOK_URL_REJECTED`` and deliveries
            to a host that now resolves to one are refused; see ``_webhook_guard``).
        allow_loopback_webhooks: let webhooks go to loopback addresses only (workers on this
            host), still refusing every other internal address.
    """

    base_path: str = "/v1/stream"
    long_poll_timeout_s: float = 30.0
    sse_max_duration_s: float = 60.0
    sse_keepalive_s: float = 15.0
    max_body_bytes: int = 64 * 1024 * 1024
    read_max_messages: int = 1000
    read_max_bytes: int = 1024 * 1024
    cache_max_age_s: int = 60
    cors_origins: tuple[str, ...] = ("*",)
    max_path_length: int = 1024
    allow_private_webhooks: bool = False
    allow_loopback_webhooks: bool = False

    def __post_init__(self) -> None:
        if not self.base_path.startswith("/") or self.base_path.endswith("/"):
            raise ValueError("base_path must start with '/' and not end with '/'")
        for name in ("long_poll_timeout_s", "sse_max_duration_s", "sse_keepalive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_body_bytes", "read_max_messages", "read_max_bytes", "max_path_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.cache_max_age_s < 0:
            raise ValueError("cache_max_age_s must not be negative")
