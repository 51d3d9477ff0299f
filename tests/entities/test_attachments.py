"""Attachments by reference (``attachments`` next to ``payload`` in a send): validated at the
send (422 over HTTP), kept on the inbox row, handed to models through the official SDKs (the
fake provider server sees them in the request) and to subprocess agents (``AGENT_ATTACHMENTS``).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import orjson
import pytest

from entities import (
    HandlerContext,
    InboxMessage,
    Registry,
    Runtime,
    SchemaValidationFailed,
    WakeEvent,
)
from entities._attachments import check_attachments
from entities._process import ProcessAgent, _environment
from entities._turns import ProcessSpec
from entities.agent import ModelClient
from entities.agent._anthropic import AnthropicModel
from entities.agent._openai import OpenAIModel
from entities.server import create_app
from streams import Append, Create
from tests._live import serving
from tests.entities._fake_providers import FakeProvider, FakeTurn
from tests.entities._fake_providers import fake_provider as fake_provider

PDF = b"%PDF-1.4 fake"
PDF_URL = "data:application/pdf;base64," + base64.b64encode(PDF).decode()
IMAGE = {"type": "image", "url": "https://example.com/pics/cat.png"}
NOTES = {"type": "file", "stream": "/uploads/notes.txt"}


def test_attachments_are_completed() -> None:
    checked = check_attachments(
        [IMAGE, {"type": "file", "url": PDF_URL, "name": "report.pdf"}, NOTES]
    )
    assert checked == [
        {"type": "image", "url": IMAGE["url"], "name": "cat.png", "mime": "image/png"},
        {"type": "file", "url": PDF_URL, "name": "report.pdf", "mime": "application/pdf"},
        {"type": "file", "stream": NOTES["stream"], "name": "notes.txt", "mime": "text/plain"},
    ]
    assert check_attachments(None) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("cat.png", "must be a list"),
        (["x"], "is an object"),
        ([{"type": "sticker", "url": "https://x/y"}], "type must be one of"),
        ([{"type": "image"}], "exactly one of url and stream"),
        ([{"type": "image", "url": "https://x/y", "stream": "/s"}], "exactly one of url"),
        ([{"type": "image", "url": "ftp://x/y.png"}], "http(s): or data:"),
        ([{"type": "image", "url": "file:///etc/passwd"}], "http(s): or data:"),
        ([{"type": "file", "stream": "uploads/x"}], "starting with /"),
        ([{"type": "file", "url": "https://x/y", "mime": "pdf"}], "type/subtype"),
        ([{"type": "file", "url": "https://x/y", "size": 3}], "unknown field"),
        ([{"type": "file", "url": "https://x/y", "name": ""}], "name must be"),
        ([IMAGE] * 21, "at most 20"),
    ],
)
def test_bad_attachments_are_refused(value: Any, message: str) -> None:
    with pytest.raises(SchemaValidationFailed, match="attachments") as caught:
        check_attachments(value)
    assert message in str(caught.value)


def agent_registry(model: ModelClient, seen: list[InboxMessage]) -> Registry:
    registry = Registry()

    @registry.define("a")
    async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
        seen.extend(wake.messages)
        if wake.messages:
            ctx.use_agent("Describe what you get.", model=model)
            result = await ctx.agent.run()
            assert result.success, result.error

    return registry


async def upload(rt: Runtime, path: str, content: bytes) -> None:
    await rt.store.commit(
        [Create(path.lstrip("/"), content_type="text/plain"), Append(path.lstrip("/"), [content])]
    )


@pytest.fixture
async def anthropic_app(
    fake_provider: FakeProvider, store_url: str
) -> AsyncIterator[tuple[Runtime, list[InboxMessage]]]:
    model = AnthropicModel(
        "claude-fake", api_key="k", base_url=fake_provider.anthropic_base_url, max_retries=0
    )
    seen: list[InboxMessage] = []
    async with Runtime(agent_registry(model, seen), store_url) as rt:
        yield rt, seen


async def test_anthropic_gets_images_documents_and_uploaded_streams(
    anthropic_app: tuple[Runtime, list[InboxMessage]], fake_provider: FakeProvider
) -> None:
    rt, seen = anthropic_app
    fake_provider.script(FakeTurn(text="A cat, a report and notes."))
    await upload(rt, NOTES["stream"], b"buy milk")
    pdf = {"type": "file", "url": PDF_URL, "name": "report.pdf"}
    await rt.spawn("/a/x")
    receipt = await rt.send("/a/x", {"text": "What are these?"}, attachments=[IMAGE, pdf, NOTES])
    await rt.run_until_idle()
    assert await rt.replies("/a/x", receipt.key) == ["A cat, a report and notes."]
    (message,) = seen
    assert [a["name"] for a in message.attachments] == ["cat.png", "report.pdf", "notes.txt"]
    (request,) = fake_provider.requests
    (user,) = request.body["messages"]
    assert user["role"] == "user"
    assert user["content"] == [
        {"type": "image", "source": {"type": "url", "url": IMAGE["url"]}},
        {
            "type": "document",
            "source": {
                "type": "base64",
                "media_type": "application/pdf",
                "data": base64.b64encode(PDF).decode(),
            },
            "title": "report.pdf",
        },
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "buy milk"},
            "title": "notes.txt",
        },
        {"type": "text", "text": "What are these?"},
    ]


async def test_a_missing_stream_is_mentioned_not_sent(
    anthropic_app: tuple[Runtime, list[InboxMessage]], fake_provider: FakeProvider
) -> None:
    rt, _ = anthropic_app
    fake_provider.script(FakeTurn(text="I cannot see it."))
    await rt.spawn("/a/y")
    await rt.send("/a/y", {"text": "look"}, attachments=[{"type": "image", "stream": "/gone"}])
    await rt.run_until_idle()
    (request,) = fake_provider.requests
    first = request.body["messages"][0]["content"][0]
    assert first["type"] == "text"
    assert "attached image 'gone'" in first["text"] and "could not be read" in first["text"]


async def test_openai_gets_image_urls_files_and_mentions(
    fake_provider: FakeProvider, store_url: str
) -> None:
    model = OpenAIModel(
        "gpt-fake", api_key="k", base_url=fake_provider.openai_base_url, max_retries=0
    )
    fake_provider.script(FakeTurn(text="Seen."))
    video = {"type": "video", "url": "https://example.com/v.mp4"}
    pdf = {"type": "file", "url": PDF_URL, "name": "report.pdf"}
    async with Runtime(agent_registry(model, []), store_url) as rt:
        await rt.spawn("/a/x")
        await rt.send("/a/x", {"text": "What are these?"}, attachments=[IMAGE, pdf, video])
        await rt.run_until_idle()
    (request,) = fake_provider.requests
    user = request.body["messages"][-1]
    assert user["content"] == [
        {"type": "text", "text": "What are these?"},
        {"type": "image_url", "image_url": {"url": IMAGE["url"]}},
        {"type": "file", "file": {"filename": "report.pdf", "file_data": PDF_URL}},
        {
            "type": "text",
            "text": "[attached video 'v.mp4', video/mp4 at https://example.com/v.mp4 "
            "(not readable by this model)]",
        },
    ]


async def test_sends_over_http_validate_and_keep_attachments(store_url: str) -> None:
    registry = Registry()
    registry.define("t", handler=lambda ctx, wake: None)
    async with Runtime(registry, store_url) as rt, serving(create_app(rt)) as base:
        await rt.spawn("/t/x")
        async with httpx2.AsyncClient(base_url=base) as client:
            url = "/_entities/entities/t/x/send"
            bad = await client.post(url, json={"payload": "hi", "attachments": [{"type": "image"}]})
            assert bad.status_code == 422
            assert "exactly one of url and stream" in bad.text
            good = await client.post(url, json={"payload": "hi", "attachments": [IMAGE]})
            assert good.status_code == 202, good.text
        events, _ = await rt.read("/t/x")
        (row,) = [e["value"] for e in events if e["type"] == "inbox"]
        assert row["attachments"] == [
            {"type": "image", "url": IMAGE["url"], "name": "cat.png", "mime": "image/png"}
        ]


def test_subprocess_agents_get_attachments_in_their_environment() -> None:
    spec = ProcessSpec(command=("agent",))
    message = InboxMessage(
        key="k",
        payload={"text": "look"},
        attachments=(
            {"type": "image", "url": IMAGE["url"], "name": "cat.png", "mime": "image/png"},
            {"type": "file", "stream": "/uploads/notes.txt", "name": "notes.txt",
             "mime": "text/plain"},
        ),
    )  # fmt: skip
    turn = ProcessAgent(spec).turn_for(message, "", "default")
    env = _environment(spec, turn)
    assert orjson.loads(env["AGENT_ATTACHMENTS"]) == [
        {"type": "image", "url": IMAGE["url"], "name": "cat.png", "mime": "image/png"},
        {"type": "file", "stream": "/uploads/notes.txt", "name": "notes.txt",
         "mime": "text/plain", "url": "/v1/stream/uploads/notes.txt"},
    ]  # fmt: skip
    assert env["AGENT_IMAGE_URL"] == IMAGE["url"]
    assert env["AGENT_FILE_URL"] == "/v1/stream/uploads/notes.txt"
