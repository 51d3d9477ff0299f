"""Reserved subscription APIs (``{base}/__ds/subscriptions/...``): wake workers on new data.

A subscription links streams (by glob ``pattern`` and/or an explicit list) and remembers, per
stream, the offset its worker acknowledged. When it is idle (no wake in flight) and a linked
stream's tail is past its acknowledged offset, the server starts a *wake* with a fresh
``wake_id`` and the next ``generation``:

* ``webhook``: the server POSTs the wake, signed with Ed25519 (``Webhook-Signature``; keys at
  ``{base}/__ds/jwks.json``), retrying with backoff. ``{"done": true}`` in the answer acks the
  snapshot at once; otherwise the worker calls ``.../callback`` with ``callback_token``.
* ``pull-wake``: the server appends ``{"type": "wake", ...}`` to ``wake_stream``; workers race to
  ``.../claim`` it, ``.../ack`` (heartbeat; ``done`` finishes) or ``.../release`` it.

A wake not finished within ``lease_ttl_ms`` (after delivery, or after the claim) expires and a new
generation starts; answers for an older wake get ``409 FENCED``. State lives in the store's side
table, so subscriptions survive restarts. Streams are linked when this server sees them written
(the store has no listing): one created after the subscription from its start, an older one from
its tail before that write.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import random
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import httpx2
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .. import KvPut, Store, StreamsError, format_offset, parse_offset
from ._protocol import Problem
from ._webhook_guard import resolve_webhook

__all__ = ["Subscriptions", "matches"]

logger = logging.getLogger("streams.server")

NAMESPACE = "streams.server.subscriptions"
KEY_NAMESPACE = "streams.server.keys"
_SIGNING_KEY = "webhook-ed25519"
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TYPES = ("webhook", "pull-wake")
_LEASE_MIN_MS, _LEASE_MAX_MS, _LEASE_DEFAULT_MS = 1_000, 600_000, 30_000


def matches(pattern: str, path: str) -> bool:
    """Glob match: ``*`` (or a ``fnmatch`` pattern) is one segment, ``**`` any number."""

    def walk(pat: list[str], segs: list[str]) -> bool:
        if not pat:
            return not segs
        if pat[0] == "**":
            return any(walk(pat[1:], segs[i:]) for i in range(len(segs) + 1))
        return bool(segs) and fnmatchcase(segs[0], pat[0]) and walk(pat[1:], segs[1:])

    return walk(pattern.split("/"), path.split("/"))


@dataclass
class Wake:
    wake_id: str
    generation: int
    token: str
    snapshot: dict[str, int]  # stream path -> tail position when the wake started
    holder: str | None = None
    lease_expires: float | None = None  # wall-clock seconds


@dataclass
class Subscription:
    id: str
    config: dict[str, Any]
    base_url: str  # where callbacks and JWKS are served, e.g. http://host:port/v1/stream
    created_at: float
    links: dict[str, list[Any]] = field(default_factory=dict)  # path -> [link_type, acked]
    generation: int = 0
    wake: Wake | None = None

    def dump(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def load(cls, raw: bytes) -> Subscription:
        data = orjson.loads(raw)
        wake = data.pop("wake")
        sub = cls(**data)
        sub.wake = None if wake is None else Wake(**wake)
        return sub


def _bad(message: str, code: str = "BAD_REQUEST") -> Problem:
    return Problem(400, code, message)


def normalize_config(body: object, validate_path: Any) -> dict[str, Any]:
    """Check a subscription body and return its canonical configuration."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    kind = body.get("type")
    if kind not in _TYPES:
        raise _bad("type must be 'webhook' or 'pull-wake'")
    pattern = body.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern or "" in pattern.split("/"):
            raise _bad("pattern must be a glob of non-empty path segments")
    raw_streams = body.get("streams", [])
    if not isinstance(raw_streams, list) or not all(isinstance(s, str) for s in raw_streams):
        raise _bad("streams must be a list of stream paths")
    if pattern is None and not raw_streams:
        raise _bad("give a pattern, streams, or both")
    lease = body.get("lease_ttl_ms", _LEASE_DEFAULT_MS)
    if type(lease) is not int or not _LEASE_MIN_MS <= lease <= _LEASE_MAX_MS:
        raise _bad(f"lease_ttl_ms must be an integer from {_LEASE_MIN_MS} to {_LEASE_MAX_MS}")
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 1000):
        raise _bad("description must be a string of at most 1000 characters")
    config: dict[str, Any] = {
        "type": kind,
        "pattern": pattern,
        "streams": sorted({validate_path(s) for s in raw_streams}),
        "lease_ttl_ms": lease,
        "description": description,
        "webhook_url": None,
        "wake_stream": None,
    }
    if kind == "webhook":
        webhook = body.get("webhook")
        url = webhook.get("url") if isinstance(webhook, dict) else None
        if not isinstance(url, str) or len(url) > 2048:
            raise _bad("a webhook subscription needs webhook.url")
        config["webhook_url"] = url  # where it may go: Subscriptions.check_webhook
    else:
        wake_stream = body.get("wake_stream")
        if not isinstance(wake_stream, str):
            raise _bad("a pull-wake subscription needs wake_stream")
        config["wake_stream"] = validate_path(wake_stream)
    return config


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Subscriptions:
    """Every subscription of one store, its wakes, deliveries and leases."""

    def __init__(
        self,
        store: Store,
        *,
        allow_private_webhooks: bool = False,
        allow_loopback_webhooks: bool = False,
    ) -> None:
        self._store = store
        self._allow_private = allow_private_webhooks
        self._allow_loopback = allow_loopback_webhooks
        self._subs: dict[str, Subscription] = {}
        self._loaded = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._key: Ed25519PrivateKey | None = None
        self._kid = ""
        self._http: httpx2.AsyncClient | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        for key, raw in await self._store.kv_scan(NAMESPACE):
            try:
                self._subs[key] = Subscription.load(raw)
            except (orjson.JSONDecodeError, TypeError, KeyError):
                logger.error("ignoring unreadable subscription record %r", key)
        self._loaded = True
        for sub in self._subs.values():  # resume wakes that were in flight
            self._resume(sub)

    def _resume(self, sub: Subscription) -> None:
        """Carry on with a wake read from the store: arm its lease, or deliver it."""
        if sub.wake is not None and sub.wake.lease_expires is not None:
            self._arm_lease(sub, sub.wake)
        elif sub.wake is not None and sub.config["type"] == "webhook":
            self._spawn(self._deliver(sub.id, sub.wake.wake_id))

    async def aclose(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, StreamsError):  # a full disk, say: the next write tries again
            logger.error("subscriptions: background work failed: %s", exc)
        else:
            logger.error("subscriptions: background work failed", exc_info=exc)

    def _later(self, delay: float, coro_fn: Any, *args: Any) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            self._spawn(coro_fn(*args))

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    # -- signing ----------------------------------------------------------------------------

    async def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            raw = await self._store.kv_get(KEY_NAMESPACE, _SIGNING_KEY)
            if raw is None:
                fresh = Ed25519PrivateKey.generate().private_bytes_raw()
                op = KvPut(KEY_NAMESPACE, _SIGNING_KEY, fresh, only_if=True, expect=None)
                await self._store.commit([op])
                raw = await self._store.kv_get(KEY_NAMESPACE, _SIGNING_KEY)
                assert raw is not None
            key = Ed25519PrivateKey.from_private_bytes(raw)
            public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            self._kid = "ds_" + _b64url(hashlib.sha256(public).digest()[:12])
            self._key = key
        return self._key

    async def jwks(self) -> dict[str, Any]:
        key = await self._signing_key()
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(public), "kid": self._kid}
        return {"keys": [{**jwk, "alg": "EdDSA", "use": "sig"}]}

    # -- views ------------------------------------------------------------------------------

    async def _tail(self, path: str) -> int | None:
        try:
            info = await self._store.head(path)
        except StreamsError:
            return None
        return parse_offset(info.next_offset)

    async def _stream_views(self, sub: Subscription, tails: dict[str, int] | None = None) -> Any:
        views = []
        for path, (link_type, acked) in sorted(sub.links.items()):
            tail = tails.get(path) if tails is not None else await self._tail(path)
            tail = acked if tail is None else tail
            views.append(
                {
                    "path": path,
                    "link_type": link_type,
                    "acked_offset": format_offset(acked),
                    "tail_offset": format_offset(tail),
                    "has_pending": tail > acked,
                }
            )
        return views

    async def describe(self, sub: Subscription) -> dict[str, Any]:
        config = sub.config
        out: dict[str, Any] = {
            "id": sub.id,
            "type": config["type"],
            "pattern": config["pattern"],
            "lease_ttl_ms": config["lease_ttl_ms"],
            "description": config["description"],
            "generation": sub.generation,
            "streams": await self._stream_views(sub),
        }
        if config["type"] == "webhook":
            await self._signing_key()
            out["webhook"] = {
                "url": config["webhook_url"],
                "signing": {
                    "alg": "ed25519",
                    "kid": self._kid,
                    "jwks_url": f"{sub.base_url}/__ds/jwks.json",
                },
            }
        else:
            out["wake_stream"] = config["wake_stream"]
        if sub.wake is not None:
            out["wake"] = {
                "wake_id": sub.wake.wake_id,
                "generation": sub.wake.generation,
                "holder": sub.wake.holder,
            }
        return out

    # -- subscription CRUD ------------------------------------------------------------------

    async def check_webhook(self, config: dict[str, Any]) -> None:
        """Refuse a webhook URL whose host is (or resolves to) an internal address.

        Raises:
            Problem: ``400 WEBHOOK_URL_REJECTED``.
        """
        url = config["webhook_url"]
        if url is None:
            return
        try:
            await resolve_webhook(
                url, allow_private=self._allow_private, allow_loopback=self._allow_loopback
            )
        except ValueError as exc:
            message = f"webhook URL {url[:200]!r} is not allowed: {exc}"
            raise _bad(message, "WEBHOOK_URL_REJECTED") from None

    async def put(self, sub_id: str, config: dict[str, Any], base_url: str) -> tuple[int, Any]:
        if not _ID.fullmatch(sub_id):
            raise _bad("a subscription id is 1-128 of A-Z a-z 0-9 . _ : -")
        async with self._lock:
            await self._ensure_loaded()
            existing = self._subs.get(sub_id)
            if existing is not None:
                if existing.config != config:
                    raise Problem(
                        409, "SUBSCRIPTION_EXISTS", "a different subscription has this id"
                    )
                return 200, await self.describe(existing)
            sub = Subscription(sub_id, config, base_url, time.time())
            for path in config["streams"]:
                sub.links[path] = ["explicit", await self._tail(path) or 0]
            self._subs[sub_id] = sub
            await self._save(sub)
            return 201, await self.describe(sub)

    async def get(self, sub_id: str) -> dict[str, Any]:
        async with self._lock:
            return await self.describe(await self._find(sub_id))

    async def delete(self, sub_id: str) -> None:
        async with self._lock:
            await self._find(sub_id)
            del self._subs[sub_id]
            await self._store.kv_put(NAMESPACE, sub_id, None)

    async def add_streams(self, sub_id: str, paths: list[str]) -> None:
        async with self._lock:
            sub = await self._find(sub_id)
            for path in paths:
                if path not in sub.links or sub.links[path][0] != "explicit":
                    acked = sub.links[path][1] if path in sub.links else await self._tail(path)
                    sub.links[path] = ["explicit", acked or 0]
            await self._save(sub)

    async def remove_stream(self, sub_id: str, path: str) -> None:
        async with self._lock:
            sub = await self._find(sub_id)
            if sub.links.pop(path, None) is None:
                raise Problem(404, "NOT_FOUND", f"stream {path!r} is not linked")
            await self._save(sub)

    async def _find(self, sub_id: str) -> Subscription:
        await self._ensure_loaded()
        sub = self._subs.get(sub_id)
        if sub is None:
            raise Problem(404, "SUBSCRIPTION_NOT_FOUND", f"no subscription {sub_id!r}")
        return sub

    async def _save(self, sub: Subscription) -> None:
        """Store ``sub`` (lock held).

        Raises:
            StreamsError: the store refused (a full disk, say). What is in memory then ran
                ahead of the store, so the stored record is taken back first: a wake that was
                never saved is dropped (the next write starts it again, once space returns),
                instead of sitting in memory with no delivery or lease to end it.
        """
        try:
            await self._store.kv_put(NAMESPACE, sub.id, sub.dump())
        except StreamsError:
            with contextlib.suppress(StreamsError):
                raw = await self._store.kv_get(NAMESPACE, sub.id)
                if raw is None:
                    self._subs.pop(sub.id, None)
                else:
                    self._subs[sub.id] = stored = Subscription.load(raw)
                    self._resume(stored)
            raise

    # -- writes observed --------------------------------------------------------------------

    def observe(self, path: str, before: int, created: bool) -> None:
        """A write to ``path`` went through this server (``before``: the tail before it)."""
        if self._loaded and not self._subs:
            return
        self._spawn(self._observe(path, before, created))

    async def _observe(self, path: str, before: int, created: bool) -> None:
        async with self._lock:
            await self._ensure_loaded()
            for sub in list(self._subs.values()):
                pattern = sub.config["pattern"]
                if path not in sub.links:
                    if pattern is None or not matches(pattern, path):
                        continue
                    sub.links[path] = ["pattern", 0 if created else before]
                    await self._save(sub)
                await self._evaluate(sub)

    # -- wakes ------------------------------------------------------------------------------

    async def _evaluate(self, sub: Subscription) -> bool:
        """Start a wake if the subscription is idle and has pending data (lock held)."""
        if sub.wake is not None or self._subs.get(sub.id) is not sub:
            return False
        tails = {path: await self._tail(path) for path in sub.links}
        pending = [p for p, t in tails.items() if t is not None and t > sub.links[p][1]]
        if not pending:
            return False
        sub.generation += 1
        snapshot = {p: t for p, t in tails.items() if t is not None}
        wake = Wake(uuid.uuid4().hex, sub.generation, secrets.token_urlsafe(24), snapshot)
        sub.wake = wake
        await self._save(sub)
        if sub.config["type"] == "webhook":
            self._spawn(self._deliver(sub.id, wake.wake_id))
        else:
            await self._announce(sub, wake, pending)
        return True

    async def _announce(self, sub: Subscription, wake: Wake, pending: list[str]) -> None:
        events = [
            {
                "type": "wake",
                "subscription_id": sub.id,
                "stream": path,
                "generation": wake.generation,
                "ts": int(time.time() * 1000),
            }
            for path in pending
        ]
        messages = [orjson.dumps(event) for event in events]
        try:
            await self._store.append(
                sub.config["wake_stream"], messages, content_type="application/json"
            )
        except StreamsError as exc:
            logger.warning("subscription %s: cannot append to its wake stream: %s", sub.id, exc)

    async def _finish(self, sub: Subscription) -> bool:
        """End the current wake; start the next if data is pending (lock held)."""
        sub.wake = None
        await self._save(sub)
        return await self._evaluate(sub)

    def _arm_lease(self, sub: Subscription, wake: Wake) -> None:
        delay = max(0.0, (wake.lease_expires or time.time()) - time.time())
        self._later(delay + 0.01, self._expire, sub.id, wake.wake_id)

    async def _expire(self, sub_id: str, wake_id: str) -> None:
        async with self._lock:
            sub = self._subs.get(sub_id)
            wake = None if sub is None else sub.wake
            if sub is None or wake is None or wake.wake_id != wake_id:
                return
            if wake.lease_expires is not None and wake.lease_expires > time.time():
                self._arm_lease(sub, wake)  # renewed by a heartbeat meanwhile
                return
            logger.info("subscription %s: wake %s expired", sub_id, wake_id)
            await self._finish(sub)

    async def _deliver(self, sub_id: str, wake_id: str) -> None:
        """POST the wake to the webhook, retrying with backoff while it is current."""
        delay = 1.0
        while True:
            async with self._lock:
                sub = self._subs.get(sub_id)
                if sub is None or sub.wake is None or sub.wake.wake_id != wake_id:
                    return
                wake = sub.wake
                body = orjson.dumps(
                    {
                        "subscription_id": sub.id,
                        "wake_id": wake.wake_id,
                        "generation": wake.generation,
                        "streams": await self._stream_views(sub, wake.snapshot),
                        "callback_url": f"{sub.base_url}/__ds/subscriptions/{sub.id}/callback",
                        "callback_token": wake.token,
                    }
                )
                url = sub.config["webhook_url"]
            key = await self._signing_key()
            stamp = str(int(time.time()))
            signature = _b64url(key.sign(stamp.encode() + b"." + body))
            headers = {
                "Content-Type": "application/json",
                "Webhook-Signature": f"t={stamp},kid={self._kid},ed25519={signature}",
            }
            ok, answer = await self._post(sub_id, url, body, headers)
            if ok:
                await self._delivered(sub_id, wake_id, answer)
                return
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 60.0)

    async def _post(
        self, sub_id: str, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[bool, object]:
        """POST one delivery to the address the webhook's host resolves to now, if allowed;
        ``(ok, answer)``."""
        try:
            target = await resolve_webhook(
                url, allow_private=self._allow_private, allow_loopback=self._allow_loopback
            )
        except ValueError as exc:  # it resolves elsewhere now (DNS rebinding, say)
            logger.warning("subscription %s: webhook delivery refused: %s", sub_id, exc)
            return False, {}
        extensions: dict[str, Any] = {}
        if target.host_header is not None:
            headers = {**headers, "Host": target.host_header}
        if target.sni_hostname is not None:
            extensions["sni_hostname"] = target.sni_hostname
        try:
            if self._http is None:
                self._http = httpx2.AsyncClient(timeout=10)
            response = await self._http.post(
                target.url, content=body, headers=headers, extensions=extensions
            )
            ok = response.is_success
            return ok, response.json() if ok and response.content else {}
        except (httpx2.HTTPError, ValueError) as exc:
            logger.warning("subscription %s: webhook delivery failed: %s", sub_id, exc)
            return False, {}

    async def _delivered(self, sub_id: str, wake_id: str, answer: object) -> None:
        async with self._lock:
            sub = self._subs.get(sub_id)
            if sub is None or sub.wake is None or sub.wake.wake_id != wake_id:
                return
            wake = sub.wake
            if isinstance(answer, dict) and answer.get("done") is True:
                for path, tail in wake.snapshot.items():
                    if path in sub.links:
                        sub.links[path][1] = max(sub.links[path][1], tail)
                await self._finish(sub)
                return
            wake.lease_expires = time.time() + sub.config["lease_ttl_ms"] / 1000
            await self._save(sub)
            self._arm_lease(sub, wake)

    # -- worker answers ---------------------------------------------------------------------

    def _current(self, sub: Subscription, body: object, token: str | None) -> Wake:
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        wake = sub.wake
        if (
            wake is None
            or body.get("wake_id") != wake.wake_id
            or body.get("generation") != wake.generation
        ):
            raise Problem(409, "FENCED", "this wake is no longer current")
        if token is None or not secrets.compare_digest(token, wake.token):
            raise Problem(401, "UNAUTHORIZED", "a valid Bearer token for this wake is required")
        return wake

    def _apply_acks(self, sub: Subscription, body: dict[str, Any]) -> None:
        acks = body.get("acks", [])
        if not isinstance(acks, list):
            raise _bad("acks must be a list")
        parsed: list[tuple[str, int]] = []
        for ack in acks:
            if not isinstance(ack, dict) or not isinstance(ack.get("stream"), str):
                raise _bad("each ack needs a stream and an offset")
            offset = ack.get("offset")
            position = parse_offset(offset) if isinstance(offset, str) else None
            if position is None or ack["stream"] not in sub.links:
                raise _bad(f"bad ack for {str(ack.get('stream'))[:200]!r}")
            parsed.append((ack["stream"], position))
        for path, position in parsed:
            sub.links[path][1] = max(sub.links[path][1], position)

    async def settle(self, sub_id: str, body: object, token: str | None) -> dict[str, Any]:
        """A webhook ``callback`` or a pull-wake ``ack``: apply acks; ``done`` ends the wake."""
        async with self._lock:
            sub = await self._find(sub_id)
            wake = self._current(sub, body, token)
            assert isinstance(body, dict)
            self._apply_acks(sub, body)
            if body.get("done") is True:
                return {"ok": True, "next_wake": await self._finish(sub)}
            wake.lease_expires = time.time() + sub.config["lease_ttl_ms"] / 1000
            await self._save(sub)
            self._arm_lease(sub, wake)
            return {"ok": True, "next_wake": False}

    async def claim(self, sub_id: str, body: object) -> dict[str, Any] | None:
        async with self._lock:
            sub = await self._find(sub_id)
            if sub.config["type"] != "pull-wake":
                raise _bad("only pull-wake subscriptions are claimed")
            worker = body.get("worker") if isinstance(body, dict) else None
            if not isinstance(worker, str) or not worker or len(worker) > 256:
                raise _bad("claim needs a worker name")
            wake = sub.wake
            if wake is not None and wake.holder is not None:
                raise Problem(
                    409,
                    "ALREADY_CLAIMED",
                    f"wake {wake.wake_id} is held by {wake.holder!r}",
                    extra={"current_holder": wake.holder},
                )
            if wake is None and not await self._evaluate(sub):
                return None
            wake = sub.wake
            assert wake is not None
            wake.holder = worker
            wake.token = secrets.token_urlsafe(24)
            wake.lease_expires = time.time() + sub.config["lease_ttl_ms"] / 1000
            await self._save(sub)
            self._arm_lease(sub, wake)
            return {
                "wake_id": wake.wake_id,
                "generation": wake.generation,
                "token": wake.token,
                "streams": await self._stream_views(sub, wake.snapshot),
                "lease_ttl_ms": sub.config["lease_ttl_ms"],
            }

    async def release(self, sub_id: str, body: object, token: str | None) -> None:
        async with self._lock:
            sub = await self._find(sub_id)
            wake = self._current(sub, body, token)
            wake.holder = None
            wake.lease_expires = None
            await self._save(sub)
            await self._announce(sub, wake, sorted(wake.snapshot))
