"""Live modes over a real uvicorn: long-poll and SSE (read with httpx_sse over httpx2)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx2
import pytest

from tests.streams._live_server import SERVER_BACKENDS, LiveServer, backend_db, running_server

httpx2.alias_httpx()  # httpx_sse imports `httpx`; make that name resolve to httpx2

from httpx_sse import ServerSentEvent, aconnect_sse  # noqa: E402


@pytest.fixture(scope="module", params=SERVER_BACKENDS)
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("server")
    with backend_db(request.param, directory) as db, running_server(db) as server:
        yield server


@pytest.fixture
def server(live: LiveServer) -> LiveServer:
    return live.scoped(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=10) as http:
        yield http


async def collect(
    client: httpx2.AsyncClient, url: str, until: str, params: dict[str, str]
) -> list[ServerSentEvent]:
    """Read SSE events until a control event mentions ``until`` (or the server ends)."""
    events: list[ServerSentEvent] = []
    async with aconnect_sse(client, "GET", url, params=params) as source:
        async for event in source.aiter_sse():
            events.append(event)
            if event.event == "control" and until in event.data:
                break
    return events


def assert_paired(events: list[ServerSentEvent]) -> None:
    for index, event in enumerate(events):
        assert event.event in ("data", "control")
        if event.event == "data":
            assert events[index + 1].event == "control"


async def test_long_poll_times_out_with_cursor(
    server: LiveServer, client: httpx2.AsyncClient
) -> None:
    url = server.stream("lp")
    await client.put(url, content=b"x", headers={"Content-Type": "text/plain"})
    tail = (await client.head(url)).headers["stream-next-offset"]
    started = time.monotonic()
    response = await client.get(url, params={"offset": tail, "live": "long-poll"})
    elapsed = time.monotonic() - started
    assert response.status_code == 204
    assert 0.4 <= elapsed < 3
    assert response.headers["stream-up-to-date"] == "true"
    assert response.headers["stream-next-offset"] == tail
    cursor = response.headers["stream-cursor"]
    assert cursor.isdigit()
    echoed = await client.get(url, params={"offset": "-1", "live": "long-poll", "cursor": cursor})
    assert echoed.status_code == 200
    assert int(echoed.headers["stream-cursor"]) > int(cursor)


async def test_long_poll_wakes_on_append(server: LiveServer, client: httpx2.AsyncClient) -> None:
    url = server.stream("lp-wake")
    await client.put(url, content=b"old", headers={"Content-Type": "text/plain"})
    waiter = asyncio.create_task(client.get(url, params={"offset": "now", "live": "long-poll"}))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await client.post(url, content=b"new", headers={"Content-Type": "text/plain"})
    response = await waiter
    assert response.status_code == 200
    assert response.content == b"new"
    assert response.headers["stream-up-to-date"] == "true"


async def test_sse_catch_up_then_live_then_close(
    server: LiveServer, client: httpx2.AsyncClient
) -> None:
    url = server.stream("sse-text")
    plain = {"Content-Type": "text/plain"}
    await client.put(url, content=b"line1\nline2", headers=plain)
    await client.post(url, content=b"\r\n\r\nevent: control\ndata: {}", headers=plain)

    async def writer() -> None:
        await asyncio.sleep(0.2)
        await client.post(url, content=b" live", headers=plain)
        await asyncio.sleep(0.1)
        await client.post(url, headers={"Stream-Closed": "true"})

    task = asyncio.create_task(writer())
    events = await collect(client, url, "streamClosed", {"offset": "-1", "live": "sse"})
    await task
    assert_paired(events)
    data = [event.data for event in events if event.event == "data"]
    assert "".join(data) == "line1\nline2\n\nevent: control\ndata: {} live"
    controls = [json.loads(event.data) for event in events if event.event == "control"]
    assert controls[0]["upToDate"] is True
    assert controls[-1]["streamClosed"] is True
    assert "streamCursor" not in controls[-1]
    offsets = [control["streamNextOffset"] for control in controls]
    assert offsets == sorted(offsets)


async def test_sse_binary_is_base64_and_json_is_arrays(
    server: LiveServer, client: httpx2.AsyncClient
) -> None:
    binary = server.stream("sse-bin")
    await client.put(binary, content=bytes(range(256)), headers={"Content-Type": "image/png"})
    async with aconnect_sse(client, "GET", binary, params={"offset": "-1", "live": "sse"}) as s:
        assert s.response.headers["stream-sse-data-encoding"] == "base64"
        events = []
        async for event in s.aiter_sse():
            events.append(event)
            if event.event == "control":
                break
    assert base64.b64decode(events[0].data) == bytes(range(256))

    doc = server.stream("sse-json")
    json_headers = {"Content-Type": "application/json"}
    await client.put(doc, content=b'[{"n":1},{"n":2}]', headers=json_headers)
    events = await collect(client, doc, "upToDate", {"offset": "-1", "live": "sse"})
    assert [json.loads(e.data) for e in events if e.event == "data"] == [[{"n": 1}, {"n": 2}]]


async def test_sse_offset_now_and_reconnect(server: LiveServer, client: httpx2.AsyncClient) -> None:
    url = server.stream("sse-now")
    await client.put(url, content=b"history", headers={"Content-Type": "text/plain"})
    events = await collect(client, url, "upToDate", {"offset": "now", "live": "sse"})
    assert [event.event for event in events] == ["control"]
    tail = json.loads(events[0].data)["streamNextOffset"]
    await client.post(url, content=b"later", headers={"Content-Type": "text/plain"})
    resumed = await collect(client, url, "upToDate", {"offset": tail, "live": "sse"})
    assert [event.data for event in resumed if event.event == "data"] == ["later"]


async def test_sse_fans_out_to_many_subscribers(
    server: LiveServer, client: httpx2.AsyncClient
) -> None:
    url = server.stream("sse-fanout")
    await client.put(url, headers={"Content-Type": "text/plain"})
    subscribers = 25
    ready = asyncio.Semaphore(0)

    async def subscribe() -> str:
        received = ""
        async with httpx2.AsyncClient(timeout=10) as own:
            params = {"offset": "-1", "live": "sse"}
            async with aconnect_sse(own, "GET", url, params=params) as source:
                async for event in source.aiter_sse():
                    if event.event == "control" and not received:
                        ready.release()
                    if event.event == "data":
                        received += event.data
                    if "streamClosed" in event.data:
                        return received
        return received

    tasks = [asyncio.create_task(subscribe()) for _ in range(subscribers)]
    for _ in range(subscribers):
        await asyncio.wait_for(ready.acquire(), 10)
    plain = {"Content-Type": "text/plain"}
    await client.post(url, content=b"a", headers=plain)
    await client.post(url, content=b"b", headers={**plain, "Stream-Closed": "true"})
    results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
    assert results == ["ab"] * subscribers


async def test_sse_ends_when_the_stream_is_deleted(
    server: LiveServer, client: httpx2.AsyncClient
) -> None:
    url = server.stream("sse-delete")
    await client.put(url, headers={"Content-Type": "text/plain"})

    async def delete_soon() -> None:
        await asyncio.sleep(0.2)
        assert (await client.delete(url)).status_code == 204

    task = asyncio.create_task(delete_soon())
    started = time.monotonic()
    events = await collect(client, url, "never-appears", {"offset": "-1", "live": "sse"})
    await task
    assert time.monotonic() - started < 4  # ended by the delete, not by the 5 s connection cap
    assert [event.event for event in events] == ["control"]
