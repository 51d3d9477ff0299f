"""The HTTP control plane over a real uvicorn server and a running worker, on every store backend.

Every bad request must get a clear 4xx with ``{"error": {"code", "message"}}`` and leave the
runtime exactly as it was (checked by listing and inspecting before and after).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from pydantic import BaseModel

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.server import create_app
from examples import all as examples_all
from tests._live import serving as live_server

TOKEN = "s3cret-token"
MAX_BODY = 4096


class GreeterArgs(BaseModel):
    name: str


def make_registry() -> Registry:
    """The examples' types plus ``greeter``, a type with an ``args_schema``."""
    registry = Registry()
    for entity_type in examples_all.registry.list():
        registry.add(entity_type)

    @registry.define("greeter", description="Greets by name", args_schema=GreeterArgs)
    async def greeter(ctx: HandlerContext, wake: WakeEvent) -> None:
        for message in wake.messages:
            ctx.reply(f"hello {ctx.args['name']}", to=message)

    @registry.define("sleeper", description="Replies after half a second")
    async def sleeper(ctx: HandlerContext, wake: WakeEvent) -> None:
        for message in wake.messages:
            await asyncio.sleep(0.5)
            ctx.reply("awake", to=message)

    return registry


@dataclass
class Served:
    base: str
    runtime: Runtime
    http: httpx2.AsyncClient

    async def settle(self) -> None:
        """Wait until no entity has a wake pending or running (spawns wake their entity)."""
        with anyio.fail_after(10):
            while True:
                listing = (await self.http.get("/_entities/entities")).json()
                if not any(e["pending"] or e["status"] == "running" for e in listing):
                    return
                await asyncio.sleep(0.02)

    async def snapshot(self) -> Any:
        """Everything a bad request must not change: the listing and every entity's inspection
        and stream length (taken once every wake has finished)."""
        await self.settle()
        listing = (await self.http.get("/_entities/entities")).json()
        details = {}
        for item in listing:
            inspected = (await self.http.get(f"/_entities/entities{item['url']}")).json()
            events, _ = await self.runtime.read(item["url"], limit=100_000)
            details[item["url"]] = (inspected, len(events))
        return listing, details


@asynccontextmanager
async def serving(db: str, *, token: str | None = None) -> AsyncIterator[Served]:
    """A real uvicorn server on a free port plus a worker, over the store at ``db``."""
    async with Runtime(make_registry(), db) as runtime:
        app = create_app(runtime, token=token, max_body_bytes=MAX_BODY)
        async with live_server(
            app,
            timeout_graceful_shutdown=2,
            h11_max_incomplete_event_size=256 * 1024,  # as serve() sets it: the app answers 431
        ) as base:
            stop = anyio.Event()
            worker_task = asyncio.create_task(runtime.worker(poll_interval=0.2).run(stop))
            try:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with httpx2.AsyncClient(base_url=base, headers=headers, timeout=10) as http:
                    yield Served(base, runtime, http)
            finally:
                stop.set()
                await worker_task


@pytest.fixture
async def served(store_url: str) -> AsyncIterator[Served]:
    async with serving(store_url) as s:
        yield s


def error_code(response: httpx2.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    return str(body["error"]["code"])


async def spawn(s: Served, url: str, body: Any = None) -> httpx2.Response:
    return await s.http.put(f"/_entities/entities{url}", json=body or {})


async def send_and_wait(s: Served, url: str, payload: Any) -> list[Any]:
    response = await s.http.post(f"/_entities/entities{url}/send", json={"payload": payload})
    assert response.status_code == 202, response.text
    receipt = response.json()
    assert receipt["url"] == url
    answer = await s.http.get(
        f"/_entities/entities{url}/replies/{receipt['key']}",
        params={"wait_ms": 10_000, "after": receipt["offset"]},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["key"] == receipt["key"]
    return list(answer.json()["replies"])


# -- spawn ------------------------------------------------------------------------------------


async def test_spawn_then_duplicate_is_409(served: Served) -> None:
    created = await spawn(served, "/counter/c1", {"tags": {"team": "a"}})
    assert created.status_code == 201, created.text
    info = created.json()
    assert info["url"] == "/counter/c1"
    assert info["type"] == "counter"
    assert info["tags"] == {"team": "a"}
    before = await served.snapshot()

    again = await spawn(served, "/counter/c1", {"tags": {"team": "b"}})
    assert again.status_code == 409
    assert error_code(again) == "DUPLICATE_URL"
    assert await served.snapshot() == before


async def test_spawn_unknown_type_is_404_and_creates_nothing(served: Served) -> None:
    response = await spawn(served, "/nosuchtype/x1")
    assert response.status_code == 404
    assert error_code(response) == "UNKNOWN_ENTITY_TYPE"
    assert (await served.http.get("/_entities/entities")).json() == []
    missing = await served.http.get("/_entities/entities/nosuchtype/x1")
    assert missing.status_code in (404,)


@pytest.mark.parametrize(
    "body",
    [
        {"args": {}},  # missing name
        {"args": {"name": 42}},  # wrong type
        {"args": [1, 2]},  # not an object
        {"unexpected": 1},  # unknown field
        {"tags": {"k": 1}},  # tag values are strings
    ],
)
async def test_spawn_bad_args_is_422_and_creates_nothing(served: Served, body: Any) -> None:
    response = await spawn(served, "/greeter/g1", body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "SCHEMA_VALIDATION_FAILED"
    assert (await served.http.get("/_entities/entities")).json() == []
    assert (await served.http.get("/_entities/entities/greeter/g1")).status_code == 404


async def test_spawn_parent_and_initial_message_are_checked(served: Served) -> None:
    """Only the runtime names an entity's parent (a child spawned by a wake): a spawn over HTTP
    naming one is refused, like a send naming an entity as its sender."""
    assert (await spawn(served, "/counter/p1")).status_code == 201
    before = await served.snapshot()
    for body, status, code in [
        ({"parent": "not a url"}, 422, "INVALID_PARENT"),
        ({"parent": "/counter/ghost"}, 422, "INVALID_PARENT"),
        ({"parent": "/counter/p1"}, 422, "INVALID_PARENT"),
        ({"initial_message": {"add": "x"}}, 422, "SCHEMA_VALIDATION_FAILED"),
    ]:
        response = await spawn(served, "/counter/c1", body)
        assert response.status_code == status, (body, response.text)
        assert error_code(response) == code
    assert await served.snapshot() == before
    await served.runtime.spawn("/counter/c1", parent="/counter/p1", initial_message={"add": 4})
    await served.settle()
    children = (
        await served.http.get("/_entities/entities", params={"parent": "/counter/p1"})
    ).json()
    assert [c["url"] for c in children] == ["/counter/c1"]
    inspected = (await served.http.get("/_entities/entities/counter/c1")).json()
    assert inspected["state"]["totals"]["total"]["value"] == 4


async def test_spawn_with_valid_args_runs_the_handler_with_them(served: Served) -> None:
    response = await spawn(served, "/greeter/g1", {"args": {"name": "Ada"}})
    assert response.status_code == 201, response.text
    assert await send_and_wait(served, "/greeter/g1", {"text": "hi"}) == ["hello Ada"]
    inspected = (await served.http.get("/_entities/entities/greeter/g1")).json()
    assert inspected["args"] == {"name": "Ada"}


@pytest.mark.parametrize("entity_id", ["bad id", "-leading-dash", "x" * 129, "a%2Fb", "é"])
async def test_spawn_bad_entity_id_is_400(served: Served, entity_id: str) -> None:
    response = await served.http.put(f"/_entities/entities/counter/{entity_id}", json={})
    assert response.status_code in (400, 404), response.text
    if response.status_code == 400:
        assert error_code(response) == "INVALID_URL"
    assert (await served.http.get("/_entities/entities")).json() == []


async def test_spawn_bad_entity_id_is_400_exactly(served: Served) -> None:
    response = await served.http.put("/_entities/entities/counter/bad%20id", json={})
    assert response.status_code == 400
    assert error_code(response) == "INVALID_URL"
    response = await served.http.put("/_entities/entities/Bad%21type/x", json={})
    assert response.status_code == 400
    assert error_code(response) == "INVALID_URL"
    assert (await served.http.get("/_entities/entities")).json() == []


# -- send and replies -------------------------------------------------------------------------


async def test_send_is_202_and_the_reply_can_be_awaited(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    assert await send_and_wait(served, "/counter/c1", {"add": 2}) == [2]
    assert await send_and_wait(served, "/counter/c1", {"add": 40}) == [42]
    inspected = (await served.http.get("/_entities/entities/counter/c1")).json()
    assert inspected["state"]["totals"]["total"]["value"] == 42


async def test_replies_without_wait_and_unknown_key(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    sent = await served.http.post(
        "/_entities/entities/counter/c1/send", json={"payload": {"add": 6}}
    )
    key = sent.json()["key"]
    waited = await served.http.get(
        f"/_entities/entities/counter/c1/replies/{key}", params={"wait_ms": 10_000}
    )
    assert waited.json()["replies"] == [6]
    for params in ({}, {"wait_ms": 0}, {"wait_ms": 1}, {"after": sent.json()["offset"]}):
        # Without waiting, a reply that is already there is still returned.
        again = await served.http.get(
            f"/_entities/entities/counter/c1/replies/{key}", params=params
        )
        assert again.status_code == 200
        assert again.json() == {
            "key": key,
            "replies": [6],
            "status": "completed",
            "error": None,
        }, params
    answer = await served.http.get("/_entities/entities/counter/c1/replies/nokey")
    assert answer.status_code == 200
    assert answer.json() == {"key": "nokey", "replies": [], "status": "pending", "error": None}
    waited = await served.http.get(
        "/_entities/entities/counter/c1/replies/nokey", params={"wait_ms": 200}
    )
    assert waited.json()["replies"] == []
    bad = await served.http.get(
        "/_entities/entities/counter/c1/replies/nokey", params={"wait_ms": "soon"}
    )
    assert bad.status_code == 400
    error_code(bad)
    missing = await served.http.get("/_entities/entities/counter/nope/replies/k")
    assert missing.status_code == 404
    assert error_code(missing) == "ENTITY_NOT_FOUND"


async def test_chat_on_message_and_on_error_replies(served: Served) -> None:
    assert (await spawn(served, "/chat/c1")).status_code == 201
    assert await send_and_wait(served, "/chat/c1", {"text": "   "}) == [
        "Please send a non-empty text message."
    ]
    [answer] = await send_and_wait(served, "/chat/c1", {"text": "hello"})
    assert "hello" in answer
    [sorry] = await send_and_wait(served, "/chat/c1", {"text": "boom"})
    assert sorry.startswith("Sorry")


async def _send_raw(s: Served, url: str, content: bytes) -> httpx2.Response:
    return await s.http.post(
        f"/_entities/entities{url}/send",
        content=content,
        headers={"Content-Type": "application/json"},
    )


async def test_send_invalid_json_is_400_and_changes_nothing(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    assert await send_and_wait(served, "/counter/c1", {"add": 1}) == [1]
    before = await served.snapshot()
    for content in (b"{not json", b'{"payload": ', b"\xff\xfe"):
        response = await _send_raw(served, "/counter/c1", content)
        assert response.status_code == 400, response.text
        assert error_code(response) == "INVALID_JSON"
    assert await served.snapshot() == before


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'"just a string"',
        b'{"payload": {"add": 1}, "extra": true}',
        b'{"payload": {"add": "one"}}',  # fails the counter's inbox schema
        b'{"payload": {"sub": 1}}',
        b'{"payload": {"add": 1}, "type": 5}',
    ],
)
async def test_send_wrong_shape_is_422_and_changes_nothing(served: Served, body: bytes) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    assert await send_and_wait(served, "/counter/c1", {"add": 1}) == [1]
    before = await served.snapshot()
    response = await _send_raw(served, "/counter/c1", body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "SCHEMA_VALIDATION_FAILED"
    assert await served.snapshot() == before


@pytest.mark.parametrize("sender", ["/counter/c2", "counter/c1", "/chat/anyone"])
async def test_send_as_an_entity_is_422_and_changes_nothing(served: Served, sender: str) -> None:
    """Over HTTP, 'from' may not name an entity: a handler would take the message for that
    entity's own (its replies, its authority). External senders name themselves."""
    assert (await spawn(served, "/counter/c1")).status_code == 201
    assert await send_and_wait(served, "/counter/c1", {"add": 1}) == [1]
    before = await served.snapshot()
    body = orjson.dumps({"payload": {"add": 1}, "from": sender})
    response = await _send_raw(served, "/counter/c1", body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "INVALID_SENDER"
    assert await served.snapshot() == before
    # a name of its own is fine, and is what the handler sees
    body = orjson.dumps({"payload": {"add": 1}, "from": "user:alice"})
    assert (await _send_raw(served, "/counter/c1", body)).status_code == 202
    with anyio.fail_after(5):
        while True:
            events, _ = await served.runtime.read("/counter/c1", "-1")
            senders = [e["value"]["from"] for e in events if e["type"] == "inbox"]
            if "user:alice" in senders:
                break
            await anyio.sleep(0.02)


async def test_oversize_bodies_are_413_and_change_nothing(served: Served) -> None:
    assert (await spawn(served, "/chat/c1")).status_code == 201
    before = await served.snapshot()
    big = b'{"payload": {"text": "' + b"x" * (MAX_BODY + 10) + b'"}}'
    response = await _send_raw(served, "/chat/c1", big)
    assert response.status_code == 413
    assert error_code(response) == "BODY_TOO_LARGE"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit still holds
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    streamed = await served.http.post(
        "/_entities/entities/chat/c1/send",
        content=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert streamed.status_code == 413
    assert error_code(streamed) == "BODY_TOO_LARGE"
    spawned = await served.http.put(
        "/_entities/entities/chat/c2",
        content=b'{"args": {"x": "' + b"y" * MAX_BODY + b'"}}',
        headers={"Content-Type": "application/json"},
    )
    assert spawned.status_code == 413
    assert await served.snapshot() == before


async def test_oversize_headers_are_431_and_change_nothing(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    before = await served.snapshot()
    response = await served.http.post(
        "/_entities/entities/counter/c1/send",
        json={"payload": {"add": 1}},
        headers={"X-Padding": "a" * 70_000},
    )
    assert response.status_code == 431
    assert error_code(response) == "HEADERS_TOO_LARGE"
    many = {f"X-Pad-{i}": "b" * 1000 for i in range(70)}
    listing = await served.http.get("/_entities/entities", params={"tag": "t" * 1000}, headers=many)
    assert listing.status_code == 431
    assert await served.snapshot() == before


async def test_send_to_unknown_entity_is_404(served: Served) -> None:
    response = await served.http.post(
        "/_entities/entities/counter/ghost/send", json={"payload": {"add": 1}}
    )
    assert response.status_code == 404
    assert error_code(response) == "ENTITY_NOT_FOUND"
    unknown_type = await served.http.post(
        "/_entities/entities/ghosttype/x/send", json={"payload": {"add": 1}}
    )
    assert unknown_type.status_code == 404
    assert error_code(unknown_type) == "UNKNOWN_ENTITY_TYPE"
    assert (await served.http.get("/_entities/entities")).json() == []
    assert await served.runtime.store.kv_scan("pending") == []


async def test_kill_then_send_is_409_entity_stopped(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    assert await send_and_wait(served, "/counter/c1", {"add": 3}) == [3]
    killed = await served.http.delete("/_entities/entities/counter/c1")
    assert killed.status_code == 200
    assert killed.json()["status"] == "stopped"
    before = await served.snapshot()
    response = await served.http.post(
        "/_entities/entities/counter/c1/send", json={"payload": {"add": 1}}
    )
    assert response.status_code == 409
    assert error_code(response) == "ENTITY_STOPPED"
    tag = await served.http.post("/_entities/entities/counter/c1/tags/k", json={"value": "v"})
    assert tag.status_code == 409
    assert error_code(tag) == "ENTITY_STOPPED"
    assert (await served.http.delete("/_entities/entities/counter/c1")).status_code == 200
    assert await served.snapshot() == before
    gone = await served.http.delete("/_entities/entities/counter/ghost")
    assert gone.status_code == 404


async def test_waiting_for_a_reply_of_a_stopped_entity_ends_at_once(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    sent = await served.http.post(
        "/_entities/entities/counter/c1/send", json={"payload": {"add": 3}}
    )
    key = sent.json()["key"]
    assert (await served.http.delete("/_entities/entities/counter/c1")).status_code == 200
    await served.settle()
    loop = asyncio.get_running_loop()
    for wanted in ("nokey", key):
        started = loop.time()
        answer = await served.http.get(
            f"/_entities/entities/counter/c1/replies/{wanted}", params={"wait_ms": 5000}
        )
        assert answer.status_code == 200
        assert loop.time() - started < 2, "the wait did not notice the stream is closed"
        assert answer.json()["replies"] in ([], [3])


# -- listing, tags, inspect, types ------------------------------------------------------------


async def test_list_filters(served: Served) -> None:
    assert (await spawn(served, "/counter/a", {"tags": {"team": "red"}})).status_code == 201
    assert (await spawn(served, "/counter/b", {"tags": {"team": "blue"}})).status_code == 201
    assert (
        await spawn(served, "/chat/c", {"tags": {"team": "red", "vip": "1"}})
    ).status_code == 201
    assert await send_and_wait(served, "/counter/a", {"add": 1}) == [1]
    assert (await served.http.delete("/_entities/entities/counter/b")).status_code == 200

    async def urls(**params: str) -> list[str]:
        response = await served.http.get("/_entities/entities", params=params)
        assert response.status_code == 200
        return sorted(item["url"] for item in response.json())

    assert await urls() == ["/chat/c", "/counter/a", "/counter/b"]
    assert await urls(type="counter") == ["/counter/a", "/counter/b"]
    assert await urls(type="chat") == ["/chat/c"]
    assert await urls(type="nosuch") == []
    assert await urls(status="stopped") == ["/counter/b"]
    assert await urls(tag="team=red") == ["/chat/c", "/counter/a"]
    assert await urls(tag="team") == ["/chat/c", "/counter/a", "/counter/b"]
    assert await urls(tag="vip") == ["/chat/c"]
    assert await urls(tag="team=green") == []
    assert await urls(type="counter", tag="team=red") == ["/counter/a"]


async def test_tags_post_and_delete(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    set_tag = await served.http.post(
        "/_entities/entities/counter/c1/tags/owner", json={"value": "ada"}
    )
    assert set_tag.status_code == 200, set_tag.text
    assert set_tag.json()["tags"] == {"owner": "ada"}
    listed = (await served.http.get("/_entities/entities", params={"tag": "owner=ada"})).json()
    assert [item["url"] for item in listed] == ["/counter/c1"]
    inspected = (await served.http.get("/_entities/entities/counter/c1")).json()
    assert inspected["tags"] == {"owner": "ada"}

    before = await served.snapshot()
    bad = await served.http.post("/_entities/entities/counter/c1/tags/owner", json={"v": "x"})
    assert bad.status_code == 422
    assert error_code(bad) == "SCHEMA_VALIDATION_FAILED"
    missing = await served.http.post(
        "/_entities/entities/counter/ghost/tags/owner", json={"value": "x"}
    )
    assert missing.status_code == 404
    assert await served.snapshot() == before

    removed = await served.http.delete("/_entities/entities/counter/c1/tags/owner")
    assert removed.status_code == 200
    assert removed.json()["tags"] == {}
    assert (await served.http.get("/_entities/entities", params={"tag": "owner"})).json() == []
    events, _ = await served.runtime.read("/counter/c1")
    tag_events = [(e["key"], e["headers"]["operation"]) for e in events if e["type"] == "tags"]
    assert tag_events == [("owner", "insert"), ("owner", "delete")]


async def test_inspect_shape(served: Served) -> None:
    assert (await spawn(served, "/counter/c1", {"tags": {"k": "v"}})).status_code == 201
    assert await send_and_wait(served, "/counter/c1", {"add": 7}) == [7]
    response = await served.http.get("/_entities/entities/counter/c1")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["url"] == "/counter/c1"
    assert data["type"] == "counter"
    assert data["id"] == "c1"
    assert data["status"] in ("idle", "running")
    assert data["tags"] == {"k": "v"}
    assert data["args"] == {}
    assert data["state"] == {"totals": {"total": {"key": "total", "value": 7}}}
    assert isinstance(data["manifest"], dict)
    assert data["runs"] >= 1
    head = await served.http.head("/_entities/entities/counter/c1")
    assert head.status_code == 200
    missing = await served.http.get("/_entities/entities/counter/nope")
    assert missing.status_code == 404
    assert error_code(missing) == "ENTITY_NOT_FOUND"


async def test_types(served: Served) -> None:
    response = await served.http.get("/_entities/types")
    assert response.status_code == 200
    by_name = {t["name"]: t for t in response.json()}
    assert set(by_name) == {t.name for t in examples_all.registry.list()} | {"greeter", "sleeper"}
    assert by_name["counter"]["inbox_schema"]["properties"]["add"]["type"] == "integer"
    assert by_name["counter"]["state"]["totals"]["primary_key"] == "key"
    assert by_name["greeter"]["args_schema"]["required"] == ["name"]
    assert by_name["chat"]["description"]


# -- the entity stream over the Durable Streams protocol ---------------------------------------


async def test_entity_stream_is_readable_as_state_protocol_events(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    assert await send_and_wait(served, "/counter/c1", {"add": 4}) == [4]
    response = await served.http.get("/v1/stream/counter/c1/main", params={"offset": "-1"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["stream-next-offset"]
    events = response.json()
    assert isinstance(events, list)
    for item in events:
        assert set(item) >= {"type", "key", "headers"}
        assert item["headers"]["operation"] in ("insert", "update", "delete")
    kinds = [item["type"] for item in events]
    assert kinds[0] == "entity_created"
    inbox = [item for item in events if item["type"] == "inbox"]
    assert [item["value"]["payload"] for item in inbox] == [{"add": 4}]
    replies = [item["value"] for item in events if item["type"] == "texts"]
    assert [(r["in_reply_to"], r["value"]) for r in replies] == [(inbox[0]["key"], 4)]
    totals = [item["value"] for item in events if item["type"] == "state:totals"]
    assert totals[-1] == {"key": "total", "value": 4}
    assert "runs" in kinds
    missing = await served.http.get("/v1/stream/counter/nope/main", params={"offset": "-1"})
    assert missing.status_code == 404


async def test_entity_stream_tails_over_sse(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    await served.settle()
    seen: list[dict[str, Any]] = []
    caught_up = anyio.Event()
    got_reply = anyio.Event()

    async def tail() -> None:
        async with served.http.sse(
            "/v1/stream/counter/c1/main",
            params={"offset": "-1", "live": "sse"},
            timeout=httpx2.Timeout(10, read=None),
        ) as source:
            async for sse in source:
                if sse.event == "control" and '"upToDate"' in sse.data:
                    caught_up.set()
                if sse.event == "data":
                    for item in httpx2.Response(200, content=sse.data.encode()).json():
                        seen.append(item)
                        if item["type"] == "texts":
                            got_reply.set()
                            return

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tail)
            await caught_up.wait()
            assert seen[0]["type"] == "entity_created"
            assert "texts" not in [item["type"] for item in seen]
            sent = await served.http.post(
                "/_entities/entities/counter/c1/send", json={"payload": {"add": 9}}
            )
            assert sent.status_code == 202
            await got_reply.wait()
    reply = seen[-1]
    assert reply["value"]["value"] == 9
    assert reply["value"]["in_reply_to"] == sent.json()["key"]


# -- bearer token ------------------------------------------------------------------------------


async def test_bearer_token(store_url: str) -> None:
    async with serving(store_url, token=TOKEN) as s:
        created = await spawn(s, "/counter/c1")
        assert created.status_code == 201
        assert await send_and_wait(s, "/counter/c1", {"add": 5}) == [5]
        before = await s.snapshot()
        async with httpx2.AsyncClient(base_url=s.base, timeout=10) as anonymous:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                requests = [
                    anonymous.put("/_entities/entities/counter/c2", json={}, headers=headers),
                    anonymous.post(
                        "/_entities/entities/counter/c1/send",
                        json={"payload": {"add": 1}},
                        headers=headers,
                    ),
                    anonymous.delete("/_entities/entities/counter/c1", headers=headers),
                    anonymous.post(
                        "/_entities/entities/counter/c1/tags/k",
                        json={"value": "v"},
                        headers=headers,
                    ),
                    anonymous.get("/_entities/entities", headers=headers),
                    anonymous.get("/_entities/types", headers=headers),
                    anonymous.get(
                        "/v1/stream/counter/c1/main", params={"offset": "-1"}, headers=headers
                    ),
                    anonymous.post(
                        "/v1/stream/counter/c1/main",
                        content=b'{"type":"x","key":"k","headers":{"operation":"insert"}}',
                        headers={**headers, "Content-Type": "application/json"},
                    ),
                    anonymous.head("/", headers=headers),
                ]
                for response in await asyncio.gather(*requests):
                    assert response.status_code == 401, (response.request.url, response.text)
                    if response.request.method != "HEAD":
                        assert error_code(response) == "UNAUTHORIZED"
            # the console's pages and assets are static (no data) and open: the console asks
            # for the token itself, and sends it with each of its requests
            root = await anonymous.get("/")
            assert root.status_code == 307 and root.headers["location"] == "/ui/"
            for path in ("/ui/", "/ui/counter/c1", "/ui/assets/app.js", "/ui/assets/api.js"):
                page = await anonymous.get(path)
                assert page.status_code == 200, (path, page.text)
                assert "counter/c1" not in page.text  # the same page for every entity
            api_js = (await anonymous.get("/ui/assets/api.js")).text
            assert "Authorization" in api_js and "sessionStorage" in api_js
        await asyncio.sleep(0.3)  # give a wrongly accepted send time to be processed
        assert await s.snapshot() == before
        assert (await s.http.get("/_entities/entities")).status_code == 200
        assert (await s.http.get("/v1/stream/counter/c1/main?offset=-1")).status_code == 200
        # what the page does to tail a stream: SSE read through fetch with the header
        sse = "/v1/stream/counter/c1/main?offset=-1&live=sse"
        async with s.http.stream("GET", sse) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            with anyio.fail_after(5):
                async for line in response.aiter_lines():
                    if line.startswith("event: data"):
                        break


async def test_entity_streams_are_read_only_over_http(served: Served) -> None:
    """A Durable Streams write could forge replies or erase history: all are refused."""
    assert (await spawn(served, "/counter/c1")).status_code == 201
    assert await send_and_wait(served, "/counter/c1", {"add": 1}) == [1]
    before = await served.snapshot()
    forged = orjson.dumps(
        {
            "type": "texts",
            "key": "f",
            "value": {"in_reply_to": "k", "value": 99},
            "headers": {"operation": "insert"},
        }
    )
    attempts = [
        served.http.post(
            "/v1/stream/counter/c1/main",
            content=forged,
            headers={"Content-Type": "application/json"},
        ),
        served.http.delete("/v1/stream/counter/c1/main"),
        served.http.put("/v1/stream/counter/c2/main", headers={"Content-Type": "application/json"}),
    ]
    for response in await asyncio.gather(*attempts):
        assert response.status_code == 405, response.text
        assert error_code(response) == "READ_ONLY"
    assert await served.snapshot() == before
    answer = await served.http.get("/_entities/entities/counter/c1/replies/k")
    assert answer.json()["replies"] == []
    head = await served.http.head("/v1/stream/counter/c1/main")
    assert head.status_code == 200


@pytest.mark.parametrize("after", ["garbage", "9999999999999999_9999999999999999"])
async def test_replies_with_a_bad_offset_is_400(served: Served, after: str) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    response = await served.http.get(
        "/_entities/entities/counter/c1/replies/k", params={"after": after}
    )
    assert response.status_code == 400
    assert error_code(response) == "BAD_OFFSET"


async def test_concurrent_spawns_of_one_url_create_it_once(served: Served) -> None:
    responses = await asyncio.gather(
        *(spawn(served, "/counter/race", {"tags": {"n": str(i)}}) for i in range(10))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 9
    winner = next(r for r in responses if r.status_code == 201).json()
    await served.settle()
    inspected = (await served.http.get("/_entities/entities/counter/race")).json()
    assert inspected["tags"] == winner["tags"]
    events, _ = await served.runtime.read("/counter/race")
    assert [e["type"] for e in events].count("entity_created") == 1


async def test_concurrent_sends_are_each_applied_once(served: Served) -> None:
    assert (await spawn(served, "/counter/c1")).status_code == 201
    values = list(range(1, 51))
    responses = await asyncio.gather(
        *(
            served.http.post("/_entities/entities/counter/c1/send", json={"payload": {"add": v}})
            for v in values
        )
    )
    assert all(r.status_code == 202 for r in responses)
    await served.settle()
    inspected = (await served.http.get("/_entities/entities/counter/c1")).json()
    assert inspected["state"]["totals"]["total"]["value"] == sum(values)
    for response in responses:
        key = response.json()["key"]
        answer = await served.http.get(f"/_entities/entities/counter/c1/replies/{key}")
        assert len(answer.json()["replies"]) == 1


async def test_kill_during_a_wake_fences_its_commit(served: Served) -> None:
    assert (await spawn(served, "/sleeper/s1")).status_code == 201
    await served.settle()
    sent = await served.http.post("/_entities/entities/sleeper/s1/send", json={"payload": {}})
    assert sent.status_code == 202
    with anyio.fail_after(5):
        while True:  # until the wake is in flight
            info = (await served.http.get("/_entities/entities/sleeper/s1")).json()
            if info["status"] == "running":
                break
            await asyncio.sleep(0.01)
    killed = await served.http.delete("/_entities/entities/sleeper/s1")
    assert killed.status_code == 200 and killed.json()["status"] == "stopped"
    await asyncio.sleep(1.0)  # the handler finishes its sleep and tries to commit
    events, _ = await served.runtime.read("/sleeper/s1")
    assert events[-1]["type"] == "entity_stopped"
    assert not [e for e in events if e["type"] == "texts"], "a fenced wake committed a reply"
    answer = await served.http.get(
        f"/_entities/entities/sleeper/s1/replies/{sent.json()['key']}", params={"wait_ms": 500}
    )
    assert answer.json()["replies"] == []
    inspected = (await served.http.get("/_entities/entities/sleeper/s1")).json()
    assert inspected["status"] == "stopped" and not inspected["pending"]
