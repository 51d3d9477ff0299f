"""The HTTP server against a real uvicorn: happy paths, and bad input that must change nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx2
import pytest

from tests.streams._live_server import (
    SERVER_BACKENDS,
    TEST_SETTINGS,
    LiveServer,
    backend_db,
    running_server,
)

ZERO = "0000000000000000_0000000000000000"


@pytest.fixture(scope="module", params=SERVER_BACKENDS)
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server per backend for the module; each test works under its own path prefix."""
    directory = tmp_path_factory.mktemp("server")
    with backend_db(request.param, directory) as db, running_server(db) as server:
        yield server


@pytest.fixture
def server(live: LiveServer) -> LiveServer:
    return live.scoped(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=10) as http:
        yield http


def snapshot(client: httpx2.Client, url: str) -> tuple[int, str | None, str | None, bytes]:
    """Everything a bad request must leave alone: status, tail, closed flag and content."""
    head = client.head(url)
    body = client.get(url).content if head.status_code == 200 else b""
    return (
        head.status_code,
        head.headers.get("stream-next-offset"),
        head.headers.get("stream-closed"),
        body,
    )


def make_text_stream(client: httpx2.Client, url: str, body: bytes = b"hello") -> None:
    response = client.put(url, content=body, headers={"Content-Type": "text/plain"})
    assert response.status_code == 201, response.text


# -- happy paths -------------------------------------------------------------------------------


def test_create_append_read_roundtrip(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("docs/a")
    created = client.put(url, content=b"hello", headers={"Content-Type": "text/plain"})
    assert created.status_code == 201
    assert created.headers["content-type"] == "text/plain"
    assert created.headers["location"] == url
    assert created.headers["x-content-type-options"] == "nosniff"
    first = created.headers["stream-next-offset"]
    again = client.put(url, headers={"Content-Type": "TEXT/PLAIN"})
    assert again.status_code == 200
    appended = client.post(url, content=b" world", headers={"Content-Type": "text/plain"})
    assert appended.status_code == 204
    assert appended.headers["stream-next-offset"] > first
    read = client.get(url)
    assert read.status_code == 200
    assert read.content == b"hello world"
    assert read.headers["stream-up-to-date"] == "true"
    assert read.headers["content-type"] == "text/plain"
    rest = client.get(url, params={"offset": first})
    assert rest.content == b" world"
    tail = client.get(url, params={"offset": "now"})
    assert tail.content == b""
    assert tail.headers["cache-control"] == "no-store"
    assert tail.headers["stream-next-offset"] == appended.headers["stream-next-offset"]


def test_etag_304_and_change_on_close(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("etag")
    make_text_stream(client, url)
    first = client.get(url)
    tag = first.headers["etag"]
    assert client.get(url, headers={"If-None-Match": tag}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    closed = client.post(url, headers={"Stream-Closed": "true"})
    assert closed.status_code == 204
    after = client.get(url)
    assert after.headers["stream-closed"] == "true"
    assert after.headers["etag"] != tag
    assert client.get(url, headers={"If-None-Match": tag}).status_code == 200


def test_json_mode_flattens_one_level(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("json")
    assert client.put(url, content=b"[]", headers={"Content-Type": "application/json"}).is_success
    json_headers = {"Content-Type": "application/json"}
    assert client.post(url, content=b'[{"a":1},{"b":2}]', headers=json_headers).status_code == 204
    assert client.post(url, content=b"[[1,2]]", headers=json_headers).status_code == 204
    assert client.post(url, content=b'"x"', headers=json_headers).status_code == 204
    assert client.get(url).json() == [{"a": 1}, {"b": 2}, [1, 2], "x"]
    assert client.get(url, params={"offset": "now"}).content == b"[]"


def test_idempotent_producer(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("producer")
    make_text_stream(client, url, b"")

    def send(epoch: int, seq: int, body: bytes = b"x") -> httpx2.Response:
        headers = {
            "Content-Type": "text/plain",
            "Producer-Id": "p1",
            "Producer-Epoch": str(epoch),
            "Producer-Seq": str(seq),
        }
        return client.post(url, content=body, headers=headers)

    first = send(0, 0, b"a")
    assert first.status_code == 200
    assert (first.headers["producer-epoch"], first.headers["producer-seq"]) == ("0", "0")
    assert send(0, 1, b"b").status_code == 200
    duplicate = send(0, 0, b"a")
    assert duplicate.status_code == 204
    assert duplicate.headers["producer-seq"] == "1"
    gap = send(0, 5)
    assert gap.status_code == 409
    assert (gap.headers["producer-expected-seq"], gap.headers["producer-received-seq"]) == (
        "2",
        "5",
    )
    assert send(1, 3).status_code == 400  # a new epoch must start at seq 0
    assert send(1, 0, b"c").status_code == 200
    fenced = send(0, 2)
    assert fenced.status_code == 403
    assert fenced.headers["producer-epoch"] == "1"
    assert client.get(url).content == b"abc"


def test_close_is_durable_and_idempotent(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("closing")
    make_text_stream(client, url, b"one")
    closed = client.post(
        url, content=b"two", headers={"Content-Type": "text/plain", "Stream-Closed": "TRUE"}
    )
    assert closed.status_code == 204
    assert closed.headers["stream-closed"] == "true"
    tail = closed.headers["stream-next-offset"]
    assert client.post(url, headers={"Stream-Closed": "true"}).status_code == 204
    refused = client.post(url, content=b"three", headers={"Content-Type": "text/plain"})
    assert refused.status_code == 409
    assert refused.headers["stream-closed"] == "true"
    assert refused.headers["stream-next-offset"] == tail
    assert client.get(url).content == b"onetwo"
    poll = client.get(url, params={"offset": tail, "live": "long-poll"})
    assert poll.status_code == 204
    assert poll.headers["stream-closed"] == "true"


def test_fork_with_sub_offsets(server: LiveServer, client: httpx2.Client) -> None:
    source = server.stream("fork/src")
    make_text_stream(client, source, b"hello")
    fork_headers = {
        "Stream-Forked-From": server.path("fork/src"),
        "Stream-Fork-Offset": ZERO,
        "Stream-Fork-Sub-Offset": "3",
    }
    fork = server.stream("fork/child")
    created = client.put(fork, content=b"XY", headers=fork_headers)
    assert created.status_code == 201
    assert created.headers["content-type"] == "text/plain"  # inherited
    assert "stream-forked-from" not in created.headers
    assert client.get(fork).content == b"helXY"
    assert client.put(fork, headers=fork_headers).status_code == 200
    mismatch = client.put(fork, headers={**fork_headers, "Stream-Fork-Sub-Offset": "2"})
    assert mismatch.status_code == 409
    too_far = client.put(
        server.stream("fork/other"), headers={**fork_headers, "Stream-Fork-Sub-Offset": "6"}
    )
    assert too_far.status_code == 400
    assert client.head(server.stream("fork/other")).status_code == 404
    # deleting the source keeps it for the fork (410), and the fork still reads through it
    assert client.delete(source).status_code == 204
    assert client.head(source).status_code == 410
    assert client.put(source, headers={"Content-Type": "text/plain"}).status_code == 409
    assert client.get(fork).content == b"helXY"
    assert client.delete(fork).status_code == 204
    assert client.head(source).status_code == 404


def test_ttl_and_expiry_metadata(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("ttl")
    created = client.put(url, headers={"Content-Type": "text/plain", "Stream-TTL": "3600"})
    assert created.status_code == 201
    head = client.head(url)
    assert head.headers["stream-ttl"] == "3600"
    assert head.headers["cache-control"] == "no-store"
    conflict = client.put(url, headers={"Content-Type": "text/plain", "Stream-TTL": "60"})
    assert conflict.status_code == 409
    expiring = server.stream("expires")
    stamp = "2999-01-01T00:00:00+00:00"
    response = client.put(expiring, headers={"Stream-Expires-At": stamp})
    assert response.status_code == 201
    assert client.head(expiring).headers["stream-expires-at"] == "2999-01-01T00:00:00.000Z"


def test_cors_preflight_and_headers(server: LiveServer, client: httpx2.Client) -> None:
    preflight = client.options(
        server.stream("any"),
        headers={
            "Origin": "https://example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "if-none-match, producer-id",
        },
    )
    assert preflight.status_code == 204
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "if-none-match" in allowed and "producer-id" in allowed
    missing = client.get(server.stream("missing"))
    assert missing.status_code == 404
    assert missing.headers["x-content-type-options"] == "nosniff"
    assert missing.headers["cross-origin-resource-policy"] == "cross-origin"
    assert "stream-next-offset" in missing.headers["access-control-expose-headers"].lower()
    assert missing.json()["error"]["code"] == "STREAM_NOT_FOUND"


# -- bad input: a clear 4xx, and nothing changes ------------------------------------------------


@pytest.mark.parametrize(
    "offset",
    [
        "",
        "abc",
        "0,1",
        "0 1",
        "../x",
        "-2",
        "now\n",
        "0000000000000000_000000000000001",
        "0000000000000001_0000000000000000",
        "0000000000000000_0000000000000001/..",
    ],
)
def test_malformed_offsets_are_rejected(
    server: LiveServer, client: httpx2.Client, offset: str
) -> None:
    url = server.stream("offsets")
    make_text_stream(client, url)
    for live in (None, "long-poll", "sse"):
        params = {"offset": offset} if live is None else {"offset": offset, "live": live}
        response = client.get(url, params=params)
        assert response.status_code == 400, (offset, live)
        assert response.json()["error"]["code"] == "BAD_OFFSET"


def test_bad_query_parameters(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("query")
    make_text_stream(client, url)
    assert client.get(url + "?offset=-1&offset=now").status_code == 400
    assert client.get(url, params={"live": "long-poll"}).status_code == 400  # no offset
    assert client.get(url, params={"live": "sse"}).status_code == 400
    assert client.get(url, params={"offset": "-1", "live": "websocket"}).status_code == 400
    bad_cursor = {"offset": "-1", "live": "long-poll", "cursor": "x1"}
    assert client.get(url, params=bad_cursor).status_code == 400
    assert client.get(url, params={"offset": "-1", "ignored": "yes"}).content == b"hello"


@pytest.mark.parametrize(
    "headers",
    [
        {"Stream-TTL": "abc"},
        {"Stream-TTL": "-1"},
        {"Stream-TTL": "+60"},
        {"Stream-TTL": "060"},
        {"Stream-TTL": "1e3"},
        {"Stream-TTL": "60.5"},
        {"Stream-Expires-At": "tomorrow"},
        {"Stream-Expires-At": "2030-01-01"},
        {"Stream-TTL": "60", "Stream-Expires-At": "2030-01-01T00:00:00Z"},
        {"Content-Type": "not a media type"},
        {"Stream-Fork-Offset": ZERO},
        {"Stream-Fork-Sub-Offset": "0"},
        {"Stream-Forked-From": "SOURCE", "Stream-Fork-Offset": "bogus"},
        {"Stream-Forked-From": "SOURCE", "Stream-Fork-Sub-Offset": "1"},
        {
            "Stream-Forked-From": "SOURCE",
            "Stream-Fork-Offset": ZERO,
            "Stream-Fork-Sub-Offset": "05",
        },
        {"Stream-Forked-From": "/elsewhere/offsets-src"},
    ],
)
def test_bad_create_headers_create_nothing(
    server: LiveServer, client: httpx2.Client, headers: dict[str, str]
) -> None:
    make_text_stream(client, server.stream("offsets-src"))
    if headers.get("Stream-Forked-From") == "SOURCE":
        headers = {**headers, "Stream-Forked-From": server.path("offsets-src")}
    url = server.stream("bad-create")
    response = client.put(url, content=b"data", headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    assert client.head(url).status_code == 404


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Type": "text/plain"}, b""),  # empty append without close
        ({}, b"data"),  # a body needs a Content-Type
        ({"Content-Type": "text/plain", "Producer-Id": "p"}, b"x"),
        ({"Content-Type": "text/plain", "Producer-Epoch": "0", "Producer-Seq": "0"}, b"x"),
        (
            {
                "Content-Type": "text/plain",
                "Producer-Id": "p",
                "Producer-Epoch": "1e3",
                "Producer-Seq": "0",
            },
            b"x",
        ),
        (
            {
                "Content-Type": "text/plain",
                "Producer-Id": "",
                "Producer-Epoch": "0",
                "Producer-Seq": "0",
            },
            b"x",
        ),
        (
            {
                "Content-Type": "text/plain",
                "Producer-Id": "p",
                "Producer-Epoch": "0",
                "Producer-Seq": "9007199254740992",
            },
            b"x",
        ),
        ({"Content-Type": "text/plain", "Stream-Seq": ""}, b"x"),
    ],
)
def test_bad_appends_change_nothing(
    server: LiveServer, client: httpx2.Client, headers: dict[str, str], body: bytes
) -> None:
    url = server.stream("appends")
    make_text_stream(client, url)
    before = snapshot(client, url)
    response = client.post(url, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert snapshot(client, url) == before


def test_bad_json_changes_nothing(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("json-bad")
    json_headers = {"Content-Type": "application/json"}
    assert client.put(url, content=b'{"ok":1}', headers=json_headers).status_code == 201
    before = snapshot(client, url)
    for body in (b"{ not json", b"[]", b'[{"a":1},', b"\xff\xfe"):
        response = client.post(url, content=body, headers=json_headers)
        assert response.status_code == 400, body
    assert snapshot(client, url) == before
    assert json.loads(before[3]) == [{"ok": 1}]
    bad_create = client.put(server.stream("json-bad-2"), content=b"{", headers=json_headers)
    assert bad_create.status_code == 400
    assert client.head(server.stream("json-bad-2")).status_code == 404


def test_oversize_bodies_get_413_and_change_nothing(
    server: LiveServer, client: httpx2.Client
) -> None:
    url = server.stream("big")
    make_text_stream(client, url)
    before = snapshot(client, url)
    too_big = b"x" * (TEST_SETTINGS.max_body_bytes + 1)
    response = client.post(url, content=too_big, headers={"Content-Type": "text/plain"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        for _ in range(too_big.__len__() // 4096 + 1):
            yield b"y" * 4096

    streamed = client.post(url, content=chunks(), headers={"Content-Type": "text/plain"})
    assert streamed.status_code == 413
    assert snapshot(client, url) == before
    created = client.put(server.stream("big-2"), content=too_big)
    assert created.status_code == 413
    assert client.head(server.stream("big-2")).status_code == 404
    just_fits = b"z" * TEST_SETTINGS.max_body_bytes
    ok = client.post(url, content=just_fits, headers={"Content-Type": "text/plain"})
    assert ok.status_code == 204


def test_conflicts_change_nothing(server: LiveServer, client: httpx2.Client) -> None:
    url = server.stream("conflicts")
    make_text_stream(client, url)
    plain = {"Content-Type": "text/plain"}
    assert client.post(url, content=b"1", headers={**plain, "Stream-Seq": "b"}).status_code == 204
    before = snapshot(client, url)
    assert client.post(url, content=b"2", headers={**plain, "Stream-Seq": "a"}).status_code == 409
    wrong_type = {"Content-Type": "application/json"}
    assert client.post(url, content=b"{}", headers=wrong_type).status_code == 409
    assert client.put(url, headers=wrong_type).status_code == 409
    assert client.put(url, headers={**plain, "Stream-Closed": "true"}).status_code == 409
    assert snapshot(client, url) == before


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
def test_unknown_stream_is_404(server: LiveServer, client: httpx2.Client, method: str) -> None:
    url = server.stream("nowhere/at-all")
    headers = {"Content-Type": "text/plain"}
    response = client.request(
        method, url, content=b"x" if method == "POST" else None, headers=headers
    )
    assert response.status_code == 404
    if method == "GET":
        for live in ("long-poll", "sse"):
            assert client.get(url, params={"offset": "-1", "live": live}).status_code == 404
    assert client.head(url).status_code == 404


@pytest.mark.parametrize("path", ["a//b", "a/", "%00x", "a/%2E%2E/b"])
def test_bad_paths_are_rejected(server: LiveServer, client: httpx2.Client, path: str) -> None:
    url = f"{server.url}/v1/stream/{server.prefix}/{path}"
    response = client.put(url, headers={"Content-Type": "text/plain"})
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["message"]


def test_reserved_and_empty_paths(server: LiveServer, client: httpx2.Client) -> None:
    reserved = client.put(f"{server.url}/v1/stream/__ds/x", headers={"Content-Type": "text/plain"})
    assert 400 <= reserved.status_code < 500
    assert client.put(f"{server.url}/v1/stream/").status_code == 400


def test_unknown_routes_and_methods(server: LiveServer, client: httpx2.Client) -> None:
    assert client.get(f"{server.url}/elsewhere").status_code == 404
    url = server.stream("methods")
    make_text_stream(client, url)
    response = client.patch(url, content=b"x")
    assert response.status_code == 405
    assert client.get(url).content == b"hello"
