"""Reserved subscription APIs over real uvicorn: signed webhooks, pull-wake leases, bad input."""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tests.streams._live_server import TEST_SETTINGS, LiveServer, running_server

# the webhook receivers here listen on 127.0.0.1, which a default server refuses
# (test_webhook_ssrf.py tests that)
LOCAL_WEBHOOKS = replace(TEST_SETTINGS, allow_private_webhooks=True)


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("server")
    db = "memory://" if request.param == "memory" else f"sqlite:///{directory / 'streams.db'}"
    with running_server(db, LOCAL_WEBHOOKS) as server:
        yield server


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=10) as http:
        yield http


class Receiver:
    """A webhook receiver on 127.0.0.1 that records requests and answers ``answer``."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.arrived:
                    outer.requests.append((dict(self.headers), body))
                    outer.arrived.notify_all()
                payload = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, count: int = 1, timeout: float = 5) -> tuple[dict[str, str], bytes]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)
            return self.requests[count - 1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[dict[str, Any]], Receiver]]:
    made: list[Receiver] = []

    def make(answer: dict[str, Any]) -> Receiver:
        made.append(Receiver(answer))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def unique() -> str:
    return uuid.uuid4().hex[:10]


def sub_url(live: LiveServer, sub_id: str) -> str:
    return f"{live.url}/v1/stream/__ds/subscriptions/{sub_id}"


def verify(jwks: dict[str, Any], header: str, body: bytes) -> bool:
    match = re.fullmatch(r"t=(\d+),kid=([^,]+),ed25519=([A-Za-z0-9_-]+)", header)
    assert match, header
    stamp, kid, signature = match.groups()
    (key,) = [k for k in jwks["keys"] if k["kid"] == kid]
    assert (key["kty"], key["crv"], key["alg"]) == ("OKP", "Ed25519", "EdDSA")
    raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
    padded = signature + "=" * (-len(signature) % 4)
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(
            base64.urlsafe_b64decode(padded), stamp.encode() + b"." + body
        )
    except InvalidSignature:
        return False
    return abs(time.time() - int(stamp)) < 300


def test_webhook_lifecycle_with_signed_delivery(
    live: LiveServer, client: httpx2.Client, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory({"done": True})
    sub_id, prefix = f"s{unique()}", f"ev{unique()}"
    config = {"type": "webhook", "pattern": f"{prefix}/*", "webhook": {"url": receiver.url}}
    created = client.put(sub_url(live, sub_id), json=config)
    assert created.status_code == 201
    signing = created.json()["webhook"]["signing"]
    assert signing["jwks_url"] == f"{live.url}/v1/stream/__ds/jwks.json"
    assert client.put(sub_url(live, sub_id), json=config).status_code == 200
    changed = {**config, "lease_ttl_ms": 5000}
    assert client.put(sub_url(live, sub_id), json=changed).status_code == 409
    jwks_response = client.get(signing["jwks_url"])
    assert jwks_response.headers["content-type"] == "application/jwk-set+json"
    jwks = jwks_response.json()

    path = f"{prefix}/a"
    client.put(live.stream(path), json={"n": 1})
    headers, body = receiver.wait()
    assert verify(jwks, headers["Webhook-Signature"], body)
    assert not verify(jwks, headers["Webhook-Signature"], body + b" ")
    wake = json.loads(body)
    assert wake["subscription_id"] == sub_id
    assert wake["callback_url"] == f"{sub_url(live, sub_id)}/callback"
    (stream,) = wake["streams"]
    assert stream["path"] == path and stream["has_pending"] is True
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the {"done": true} answer acks the snapshot
        view = client.get(sub_url(live, sub_id)).json()
        if view["streams"][0]["acked_offset"] == stream["tail_offset"]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the synchronous done answer was not applied")
    assert client.delete(sub_url(live, sub_id)).status_code == 204
    assert client.get(sub_url(live, sub_id)).status_code == 404
    client.post(live.stream(path), json={"n": 2})
    time.sleep(0.2)
    assert len(receiver.requests) == 1  # a deleted subscription wakes nobody


def test_webhook_callback_token_and_fencing(
    live: LiveServer, client: httpx2.Client, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory({})
    sub_id, path = f"s{unique()}", f"cb{unique()}/x"
    config = {"type": "webhook", "streams": [path], "webhook": {"url": receiver.url}}
    assert client.put(sub_url(live, sub_id), json=config).status_code == 201
    client.put(live.stream(path), json=[])  # empty: nothing pending yet
    client.post(live.stream(path), json={"n": 1})
    wake = json.loads(receiver.wait()[1])
    tail = wake["streams"][0]["tail_offset"]
    ack = {
        "wake_id": wake["wake_id"],
        "generation": wake["generation"],
        "acks": [{"stream": path, "offset": tail}],
        "done": True,
    }
    url = wake["callback_url"]
    wrong = client.post(url, json=ack, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    bad_ack = {**ack, "acks": [{"stream": path, "offset": "garbage"}]}
    token = {"Authorization": f"Bearer {wake['callback_token']}"}
    assert client.post(url, json=bad_ack, headers=token).status_code == 400
    done = client.post(url, json=ack, headers=token)
    assert done.status_code == 200
    assert done.json() == {"ok": True, "next_wake": False}
    stale = client.post(url, json=ack, headers=token)
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "FENCED"
    client.post(live.stream(path), json={"n": 2})
    second = json.loads(receiver.wait(2)[1])
    assert second["generation"] == wake["generation"] + 1


def test_pull_wake_claim_ack_release(live: LiveServer, client: httpx2.Client) -> None:
    sub_id, prefix, pool = f"p{unique()}", f"pw{unique()}", f"pool{unique()}"
    client.put(live.stream(pool), json=[])
    config = {"type": "pull-wake", "pattern": f"{prefix}/**", "wake_stream": pool}
    assert client.put(sub_url(live, sub_id), json=config).status_code == 201
    claim_url = f"{sub_url(live, sub_id)}/claim"
    assert client.post(claim_url, json={"worker": "w1"}).status_code == 204  # nothing pending
    path = f"{prefix}/deep/er"
    client.put(live.stream(path), json={"n": 1})
    claimed = client.post(claim_url, json={"worker": "w1"})
    assert claimed.status_code == 200
    wake = claimed.json()
    busy = client.post(claim_url, json={"worker": "w2"})
    assert busy.status_code == 409
    assert busy.json()["error"] == {
        "code": "ALREADY_CLAIMED",
        "message": busy.json()["error"]["message"],
        "current_holder": "w1",
    }
    events = client.get(live.stream(pool)).json()
    assert any(e["subscription_id"] == sub_id and e["stream"] == path for e in events)
    token = {"Authorization": f"Bearer {wake['token']}"}
    released = client.post(
        f"{sub_url(live, sub_id)}/release",
        json={"wake_id": wake["wake_id"], "generation": wake["generation"]},
        headers=token,
    )
    assert released.status_code == 204
    again = client.post(claim_url, json={"worker": "w2"}).json()
    assert again["wake_id"] == wake["wake_id"]  # released, not finished: the same wake
    tail = again["streams"][0]["tail_offset"]
    acked = client.post(
        f"{sub_url(live, sub_id)}/ack",
        json={
            "wake_id": again["wake_id"],
            "generation": again["generation"],
            "acks": [{"stream": path, "offset": tail}],
            "done": True,
        },
        headers={"Authorization": f"Bearer {again['token']}"},
    )
    assert acked.json() == {"ok": True, "next_wake": False}
    assert client.post(claim_url, json={"worker": "w1"}).status_code == 204


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"pattern": "a/*"}',
        b'{"type": "webhook", "pattern": "a/*"}',
        b'{"type": "webhook", "pattern": "a/*", "webhook": {"url": "ftp://example.com/x"}}',
        b'{"type": "pull-wake", "pattern": "a/*"}',
        b'{"type": "pull-wake", "pattern": "a//b", "wake_stream": "w"}',
        b'{"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 5}',
        b'{"type": "pull-wake", "wake_stream": "w"}',
        b'{"type": "pull-wake", "streams": ["ok", "bad//path"], "wake_stream": "w"}',
    ],
)
def test_bad_subscriptions_create_nothing(
    live: LiveServer, client: httpx2.Client, body: bytes
) -> None:
    sub_id = f"bad{unique()}"
    response = client.put(
        sub_url(live, sub_id), content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    assert client.get(sub_url(live, sub_id)).status_code == 404


def test_reserved_namespace_errors(live: LiveServer, client: httpx2.Client) -> None:
    base = f"{live.url}/v1/stream/__ds"
    assert client.get(f"{base}/nothing").status_code == 404
    assert client.get(f"{base}/subscriptions/missing").status_code == 404
    assert client.delete(f"{base}/subscriptions/missing").status_code == 404
    assert client.put(f"{base}/subscriptions/bad%20id", json={}).status_code == 400
    ack = {"wake_id": "x", "generation": 1, "done": True}
    assert client.post(f"{base}/subscriptions/missing/ack", json=ack).status_code == 404


def test_subscriptions_survive_a_restart(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'streams.db'}"
    config = {"type": "pull-wake", "pattern": "jobs/*", "wake_stream": "pool"}
    with running_server(db) as first, httpx2.Client(timeout=10) as client:
        client.put(first.stream("pool"), json=[])
        assert client.put(sub_url(first, "keep"), json=config).status_code == 201
        kid = client.get(f"{first.url}/v1/stream/__ds/jwks.json").json()["keys"][0]["kid"]
    with running_server(db) as second, httpx2.Client(timeout=10) as client:
        assert client.put(sub_url(second, "keep"), json=config).status_code == 200
        client.put(second.stream("jobs/1"), json={"n": 1})
        claimed = client.post(f"{sub_url(second, 'keep')}/claim", json={"worker": "w"})
        assert claimed.status_code == 200
        assert claimed.json()["generation"] == 1
        again = client.get(f"{second.url}/v1/stream/__ds/jwks.json").json()
        assert again["keys"][0]["kid"] == kid  # the signing key is kept too
