"""A small HTTP client of the control plane, for the client commands."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import click
import httpx2
import orjson

__all__ = ["Client"]


class RequestRefused(click.ClickException):
    """The server refused the request (a 4xx answer): the caller's to fix, exit status 2."""

    exit_code = 2


TOKEN_HINT = "pass --token TOKEN or set ENTITIES_TOKEN (the token `entities serve --token` uses)"


# how long a request with an idempotency key is retried while the server cannot be reached
RETRY_SECONDS = 30.0


class Client:
    """Talks to ``entities serve`` at ``base_url`` (bearer ``token``, else ``ENTITIES_TOKEN``)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        token = token or os.environ.get("ENTITIES_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.token_sent = bool(token)
        self.base_url = base_url.rstrip("/")
        self.http = httpx2.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Any:
        """Send one request; return the decoded JSON answer. With ``idempotency_key`` (sent as
        the ``Idempotency-Key`` header) a request whose connection failed is sent again, for up
        to ``RETRY_SECONDS``: the server applies it once and answers the retry as the first.

        Raises:
            click.ClickException: the server is unreachable or answered with an error.
        """
        content = None if body is None else orjson.dumps(body)
        query = {k: v for k, v in params.items() if v is not None}
        headers = {"Content-Type": "application/json"} if content else {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        deadline = time.monotonic() + (RETRY_SECONDS if idempotency_key else 0)
        delay = 0.1
        while True:
            try:
                response = self.http.request(
                    method, path, content=content, params=query, headers=headers or None
                )
                break
            except httpx2.TransportError as exc:
                if time.monotonic() + delay > deadline:
                    raise self._unreachable(exc) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        if response.status_code >= 400:
            raise self._refused(response)
        if not response.content:
            return None
        return response.json()

    def _refused(self, response: httpx2.Response) -> click.ClickException:
        """The error for an error answer: a 4xx is the request's fault, a usage error (exit
        status 2); a 5xx is the server's (exit status 1)."""
        if response.status_code < 500:
            return RequestRefused(self._error(response))
        return click.ClickException(self._error(response))

    def _error(self, response: httpx2.Response) -> str:
        """What an error answer says; a ``401`` says how to give the token."""
        if response.status_code == 401:
            if self.token_sent:
                return f"UNAUTHORIZED: the server refused the token given; {TOKEN_HINT}"
            return f"UNAUTHORIZED: the server requires a bearer token; {TOKEN_HINT}"
        return _error_message(response)

    def _unreachable(self, exc: Exception) -> click.ClickException:
        return click.ClickException(
            f"cannot reach {self.base_url} ({exc}); is `entities serve` running? "
            "Set --server or ENTITIES_URL."
        )

    def call(
        self,
        url: str,
        payload: Any,
        *,
        wait_ms: int,
        message_type: str | None = None,
        mode: str = "queued",
        idempotency_key: str | None = None,
        attachments: list[dict[str, str]] | None = None,
    ) -> Any:
        """Send ``payload`` to the entity at ``url`` (``/type/id``) and wait up to ``wait_ms``
        for its replies in the same request (``POST …/call``): ``{url, key, offset, replies,
        status, error, timed_out}``. With ``idempotency_key`` a retry after a lost connection
        sends nothing new and answers with the first message's replies.

        Raises:
            click.ClickException: the server is unreachable or answered with an error.
        """
        body: dict[str, Any] = {"payload": payload, "type": message_type, "wait_ms": wait_ms}
        if mode != "queued":
            body["mode"] = mode
        if attachments:
            body["attachments"] = attachments
        return self.request(
            "POST", f"/_entities/entities{url}/call", body, idempotency_key=idempotency_key
        )

    def offset_before_tail(self, url: str, count: int) -> str:
        """The offset ``count`` events before the tail of the entity's stream (``-1`` for a
        shorter one): where ``--last`` starts reading.

        Raises:
            click.ClickException: the server is unreachable or answered with an error.
        """
        try:
            response = self.http.head(f"/v1/stream{url}/main")
        except httpx2.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise self._refused(response)
        tail = response.headers.get("stream-next-offset", "-1")
        segment, _, position = tail.rpartition("_")
        if not position.isdigit() or int(position) <= count:
            return "-1"
        return f"{segment}_{int(position) - count:0{len(position)}d}"

    def stream_events(self, url: str, offset: str, *, live: bool) -> Iterator[tuple[Any, str]]:
        """Yield ``(event, offset)`` from an entity's stream; with ``live``, tail it over SSE."""
        path = f"/v1/stream{url}/main"
        if not live:
            while True:
                try:
                    response = self.http.get(path, params={"offset": offset})
                except httpx2.TransportError as exc:
                    raise self._unreachable(exc) from None
                if response.status_code >= 400:
                    raise self._refused(response)
                offset = response.headers.get("stream-next-offset", offset)
                for item in response.json():
                    yield item, offset
                if response.headers.get("stream-up-to-date") == "true":
                    return
        connected = False
        backoff = 0.25
        while True:
            try:
                yield from self._tail(path, offset)
                return
            except _Reconnect as again:
                offset = again.offset
                connected = True
                if again.served:  # a served tail ended (time limit, restart): resume now
                    backoff = 0.25
                    continue
            except httpx2.TransportError as exc:
                # Unreachable at first: an error. Lost later (a restart): keep trying.
                if not connected:
                    raise self._unreachable(exc) from None
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _tail(self, path: str, offset: str) -> Iterator[tuple[Any, str]]:
        """One SSE connection; raises :class:`_Reconnect` when the server ends it while the
        stream is still open."""
        connected = False
        try:
            with self.http.stream(
                "GET", path, params={"offset": offset, "live": "sse"}, timeout=None
            ) as response:
                if response.status_code == 503:  # shutting down: come back later
                    raise _Reconnect(offset, served=False)
                if response.status_code >= 400:
                    response.read()
                    raise self._refused(response)
                connected = True
                kind = ""
                data: list[str] = []
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif line == "" and data:
                        payload = orjson.loads("\n".join(data))
                        data = []
                        if kind == "control":
                            offset = payload.get("streamNextOffset", offset)
                            if payload.get("streamClosed"):
                                return
                        elif kind == "data":
                            for item in payload:
                                yield item, offset
        except httpx2.TransportError:
            if not connected:
                raise
        raise _Reconnect(offset, served=connected)


class _Reconnect(Exception):
    """An SSE tail ended while its stream is open: resume from ``offset``."""

    def __init__(self, offset: str, *, served: bool) -> None:
        super().__init__(offset)
        self.offset = offset
        self.served = served


def _error_message(response: httpx2.Response) -> str:
    """``CODE: message`` from an error answer (with details), else the status and body."""
    try:
        error = response.json()["error"]
        message = f"{error['code']}: {error['message']}"
        if error.get("details"):
            message += "\n" + orjson.dumps(error["details"]).decode()
    except Exception:
        message = f"HTTP {response.status_code}: {response.text[:500]}"
    return message
