"""Webhook URLs may not reach internal addresses, in any notation, unless the server allows it.

The host is resolved and every address checked with :mod:`ipaddress`, at creation and at every
delivery (which then goes to the address checked, keeping ``Host``), over a real uvicorn.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from click.testing import CliRunner

import streams.__main__ as cli
from streams.server import ServerSettings
from streams.server import _webhook_guard as guard
from tests.streams._live_server import TEST_SETTINGS, running_server
from tests.streams.test_server_subscriptions import Receiver

INTERNAL_HOSTS = [
    "2130706433",
    "0x7f000001",
    "127.1",
    "0",
    "167772161",
    "0177.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "localhost",
    "169.254.169.254",
    "10.0.0.1",
    "192.168.1.1",
    "172.16.0.1",
    "127.0.0.1",
    "[::]",
    "[fe80::1]",
    "[fd00::1]",
    "224.0.0.1",
    "100.64.0.1",
]


@pytest.mark.parametrize("host", INTERNAL_HOSTS)
async def test_internal_hosts_are_refused_in_every_notation(host: str) -> None:
    with pytest.raises(ValueError, match="resolves to"):
        await guard.resolve_webhook(f"http://{host}:8080/hook", allow_private=False)
    allowed = await guard.resolve_webhook(f"http://{host}:8080/hook", allow_private=True)
    assert allowed.url == f"http://{host}:8080/hook"


LOOPBACK_HOSTS = ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "[::1]", "localhost"]


@pytest.mark.parametrize("host", INTERNAL_HOSTS)
async def test_allow_loopback_lets_only_loopback_through(host: str) -> None:
    url = f"http://{host}:8080/hook"
    if host in LOOPBACK_HOSTS or host in ("127.0.0.1", "[::ffff:127.0.0.1]"):
        target = await guard.resolve_webhook(url, allow_private=False, allow_loopback=True)
        assert target.host_header == f"{host}:8080"
    else:
        with pytest.raises(ValueError, match="resolves to"):
            await guard.resolve_webhook(url, allow_private=False, allow_loopback=True)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "http:///x", "http://user:pw@93.184.216.34/x", "http://h:99999/"]
)
async def test_malformed_webhook_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        await guard.resolve_webhook(url, allow_private=False)


async def test_a_public_address_is_pinned_and_keeps_its_host() -> None:
    target = await guard.resolve_webhook("https://93.184.216.34:8443/h?q=1", allow_private=False)
    assert target.url == "https://93.184.216.34:8443/h?q=1"
    assert target.host_header == "93.184.216.34:8443"
    assert target.sni_hostname == "93.184.216.34"


def test_refused_reason_covers_mapped_and_6to4_forms() -> None:
    assert guard.refused_reason(ipaddress.ip_address("::ffff:127.0.0.1")) is not None
    assert guard.refused_reason(ipaddress.ip_address("2002:7f00:1::")) is not None  # 6to4
    assert guard.refused_reason(ipaddress.ip_address("93.184.216.34")) is None
    assert guard.refused_reason(ipaddress.ip_address("2606:4700::1111")) is None


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db = f"sqlite:///{tmp_path_factory.mktemp('ssrf') / 'streams.db'}"
    with running_server(db, TEST_SETTINGS) as server:
        yield server.url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver({"done": True})
    yield made
    made.close()


def subscription(base: str) -> str:
    return f"{base}/v1/stream/__ds/subscriptions/s{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("host", INTERNAL_HOSTS)
def test_the_server_refuses_internal_webhooks(
    strict_server: str, receiver: Receiver, host: str
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    body = {"type": "webhook", "pattern": "ssrf/*", "webhook": {"url": f"http://{host}:{port}/"}}
    with httpx2.Client(timeout=10) as http:
        url = subscription(strict_server)
        answer = http.put(url, json=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "WEBHOOK_URL_REJECTED"
        assert http.get(url).status_code == 404
        http.put(f"{strict_server}/v1/stream/ssrf/{uuid.uuid4().hex}", json=[{"n": 1}])
    time.sleep(0.2)
    assert receiver.requests == []


def test_a_host_that_rebinds_to_loopback_gets_no_delivery(
    strict_server: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Public when the subscription is made, loopback at delivery: nothing is sent."""
    answers = iter([["93.184.216.34"]])

    async def rebinding(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address(a) for a in next(answers, ["127.0.0.1"])]

    monkeypatch.setattr(guard, "_addresses", rebinding)
    port = receiver.url.split(":")[2].split("/")[0]
    pattern = f"rebind{uuid.uuid4().hex[:8]}/*"
    body = {"type": "webhook", "pattern": pattern, "webhook": {"url": f"http://h.test:{port}/"}}
    with httpx2.Client(timeout=10) as http:
        assert http.put(subscription(strict_server), json=body).status_code == 201
        http.put(f"{strict_server}/v1/stream/{pattern[:-2]}/s", json=[{"n": 1}])
    time.sleep(1.0)
    assert receiver.requests == []


def test_a_delivery_goes_to_the_checked_address_with_the_original_host(
    strict_server: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def resolved(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(guard, "_addresses", resolved)
    monkeypatch.setattr(guard, "refused_reason", lambda address, **_: None)
    port = receiver.url.split(":")[2].split("/")[0]
    pattern = f"pin{uuid.uuid4().hex[:8]}/*"
    body = {"type": "webhook", "pattern": pattern, "webhook": {"url": f"http://h.test:{port}/"}}
    with httpx2.Client(timeout=10) as http:
        assert http.put(subscription(strict_server), json=body).status_code == 201
        http.put(f"{strict_server}/v1/stream/{pattern[:-2]}/s", json=[{"n": 1}])
    headers, _body = receiver.wait()
    assert headers["Host"] == f"h.test:{port}"


def test_allow_private_webhooks_flag_reaches_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[ServerSettings] = []

    def fake_serve(db: str, **kwargs: Any) -> None:
        seen.append(kwargs["settings"])

    monkeypatch.setattr(cli, "serve", fake_serve)
    db = f"sqlite:///{tmp_path / 'x.db'}"
    runner = CliRunner()
    assert runner.invoke(cli.main, ["serve", "--db", db]).exit_code == 0
    assert runner.invoke(cli.main, ["serve", "--db", db, "--allow-private-webhooks"]).exit_code == 0
    assert (
        runner.invoke(cli.main, ["serve", "--db", db, "--allow-loopback-webhooks"]).exit_code == 0
    )
    assert [s.allow_private_webhooks for s in seen] == [False, True, False]
    assert [s.allow_loopback_webhooks for s in seen] == [False, False, True]
