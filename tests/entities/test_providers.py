"""The ``anthropic:`` and ``openai:`` model clients, through the REAL official SDKs, against a local
fake HTTP server speaking each provider's streaming wire format (``_fake_providers``).

Nothing is mocked: the SDKs build real requests, the fake records them and streams real SSE
back, and the adapters parse what the SDKs decode.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from entities.agent import ChatMessage, ModelError, ToolCall, ToolSpec, resolve_model
from entities.agent._anthropic import AnthropicModel
from entities.agent._openai import OpenAIModel
from tests.entities._fake_providers import (
    FakeProvider,
    FakeToolCall,
    FakeTurn,
    RecordedRequest,
    by_round,
    in_order,
    read_request_log,
    running_fake,
)
from tests.entities._fake_providers import fake_provider as fake_provider
from tests.entities._support import free_port

KEY = "sk-test-key"
ANTHROPIC_MODEL = "claude-fake-1"
OPENAI_MODEL = "gpt-fake-1"
SYSTEM = "You are a weather bot."

WEATHER = ToolSpec(
    "weather",
    "Current weather for a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CLOCK = ToolSpec("clock", "The current time.", {})

QUESTION = (ChatMessage("user", "What is the weather in Paris and Rome?"),)
HISTORY = (
    *QUESTION,
    ChatMessage(
        "assistant",
        "Let me check.",
        tool_calls=(
            ToolCall("call_1", "weather", {"city": "Paris"}),
            ToolCall("call_2", "weather", {"city": "Rome"}),
        ),
    ),
    ChatMessage("tool", "18C and sunny", tool_call_id="call_1", name="weather"),
    ChatMessage(
        "tool", "unknown city 'Rome'", tool_call_id="call_2", name="weather", is_error=True
    ),
    ChatMessage("user", "And tomorrow?"),
)

TOOL_TURN = FakeTurn(
    text=["Checking ", "both ", "cities."],
    tool_calls=(
        FakeToolCall("weather", {"city": "Paris", "units": "metric"}, id="tc_a"),
        FakeToolCall("weather", {"city": "Rome", "days": [1, 2, 3]}, id="tc_b"),
    ),
    input_tokens=120,
    output_tokens=42,
)


class Deltas:
    """An ``on_text`` callback recording the deltas in order."""

    def __init__(self) -> None:
        self.items: list[str] = []

    async def __call__(self, text: str) -> None:
        self.items.append(text)


@pytest.fixture(autouse=True)
def _no_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def anthropic_model(fake: FakeProvider, max_retries: int = 0) -> AnthropicModel:
    return AnthropicModel(
        ANTHROPIC_MODEL, api_key=KEY, base_url=fake.anthropic_base_url, max_retries=max_retries
    )


def openai_model(fake: FakeProvider, max_retries: int = 0) -> OpenAIModel:
    return OpenAIModel(
        OPENAI_MODEL, api_key=KEY, base_url=fake.openai_base_url, max_retries=max_retries
    )


def sent_api_key(request: RecordedRequest) -> str | None:
    """The key the SDK sent: ``x-api-key`` or ``Authorization: Bearer`` (the anthropic SDK 2.x
    sends its API key as a bearer token)."""
    bearer = request.headers.get("authorization", "")
    return request.headers.get("x-api-key") or bearer.removeprefix("Bearer ") or None


def only_request(fake: FakeProvider) -> RecordedRequest:
    [request] = fake.requests
    return request


# --- Anthropic ---------------------------------------------------------------------------------


async def test_anthropic_streams_text_deltas_in_order(fake_provider: FakeProvider) -> None:
    fake_provider.script(FakeTurn(text=["Hel", "lo", ", wor", "ld!"], input_tokens=7))
    deltas = Deltas()
    response = await anthropic_model(fake_provider).complete(
        system=SYSTEM, messages=QUESTION, tools=(), max_tokens=321, on_text=deltas
    )
    assert deltas.items == ["Hel", "lo", ", wor", "ld!"]
    assert response.text == "Hello, world!"
    assert response.tool_calls == ()
    assert response.stop_reason == "end_turn"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 5)
    assert response.model == ANTHROPIC_MODEL

    request = only_request(fake_provider)
    assert request.provider == "anthropic"
    assert request.path == "/v1/messages"
    assert sent_api_key(request) == KEY
    body = request.body
    assert body["stream"] is True
    assert body["model"] == ANTHROPIC_MODEL
    assert body["max_tokens"] == 321
    assert body["system"] == SYSTEM  # top-level, not a message
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": QUESTION[0].content}]}
    ]
    assert "tools" not in body
    assert "temperature" not in body


async def test_anthropic_tool_calls_from_partial_json(fake_provider: FakeProvider) -> None:
    fake_provider.script(TOOL_TURN)
    deltas = Deltas()
    response = await anthropic_model(fake_provider).complete(
        system=SYSTEM, messages=QUESTION, tools=(WEATHER, CLOCK), on_text=deltas
    )
    assert deltas.items == ["Checking ", "both ", "cities."]
    assert response.text == "Checking both cities."
    assert response.tool_calls == (
        ToolCall("tc_a", "weather", {"city": "Paris", "units": "metric"}),
        ToolCall("tc_b", "weather", {"city": "Rome", "days": [1, 2, 3]}),
    )
    assert response.stop_reason == "tool_use"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (120, 42)
    assert only_request(fake_provider).body["tools"] == [
        {
            "name": "weather",
            "description": "Current weather for a city.",
            "input_schema": WEATHER.parameters,
        },
        {
            "name": "clock",
            "description": "The current time.",
            "input_schema": {"type": "object", "properties": {}},
        },
    ]


async def test_anthropic_maps_history_with_tool_results(fake_provider: FakeProvider) -> None:
    fake_provider.script(FakeTurn(text="Paris is sunny; Rome is unknown."))
    response = await anthropic_model(fake_provider).complete(
        system=SYSTEM, messages=HISTORY, tools=(WEATHER,), temperature=0.25
    )
    assert response.text == "Paris is sunny; Rome is unknown."
    body = only_request(fake_provider).body
    assert body["temperature"] == 0.25
    assert body["system"] == SYSTEM
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": QUESTION[0].content}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",  # tool results first, then the user's text, in one turn
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "is_error": False,
                    "content": "18C and sunny",
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "is_error": True,
                    "content": "unknown city 'Rome'",
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]


async def test_anthropic_invalid_tool_json_is_kept_raw(fake_provider: FakeProvider) -> None:
    fake_provider.script(
        FakeTurn(tool_calls=(FakeToolCall("weather", raw_arguments='{"city": "Par', id="t1"),)),
        FakeTurn(text="ok"),
    )
    model = anthropic_model(fake_provider)
    response = await model.complete(system="", messages=QUESTION, tools=(WEATHER,))
    assert response.tool_calls == (ToolCall("t1", "weather", '{"city": "Par'),)
    # and sent back as an object, as the API requires
    history = (
        *QUESTION,
        ChatMessage("assistant", tool_calls=response.tool_calls),
        ChatMessage("tool", "invalid JSON", tool_call_id="t1", name="weather", is_error=True),
    )
    await model.complete(system="", messages=history, tools=(WEATHER,))
    body = fake_provider.requests[1].body
    assert "system" not in body
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "t1", "name": "weather", "input": {"raw": '{"city": "Par'}}
        ],
    }


async def test_anthropic_stop_reason_max_tokens(fake_provider: FakeProvider) -> None:
    fake_provider.script(FakeTurn(text="cut sho", stop_reason="max_tokens"))
    response = await anthropic_model(fake_provider).complete(
        system=SYSTEM, messages=QUESTION, tools=()
    )
    assert (response.text, response.stop_reason) == ("cut sho", "max_tokens")


@pytest.mark.parametrize("status", [400, 401, 500, 529])
async def test_anthropic_http_error_is_model_error(
    fake_provider: FakeProvider, status: int
) -> None:
    fake_provider.script(FakeTurn(status=status, error=f"scripted failure {status}"))
    with pytest.raises(ModelError, match=rf"HTTP {status}.*scripted failure {status}"):
        await anthropic_model(fake_provider).complete(system=SYSTEM, messages=QUESTION, tools=())
    assert fake_provider.count == 1  # max_retries=0


async def test_anthropic_retries_a_500(fake_provider: FakeProvider) -> None:
    fake_provider.script(FakeTurn(status=500, error="transient"), FakeTurn(text="recovered"))
    response = await anthropic_model(fake_provider, max_retries=1).complete(
        system=SYSTEM, messages=QUESTION, tools=()
    )
    assert response.text == "recovered"
    assert fake_provider.count == 2


async def test_anthropic_error_event_mid_stream(fake_provider: FakeProvider) -> None:
    # events: message_start, ping, block start, "a", "b", then an error event
    fake_provider.script(FakeTurn(text=["a", "b", "c"], fail_after=5, error="overloaded now"))
    deltas = Deltas()
    with pytest.raises(ModelError, match="overloaded now"):
        await anthropic_model(fake_provider).complete(
            system=SYSTEM, messages=QUESTION, tools=(), on_text=deltas
        )
    assert deltas.items == ["a", "b"]


async def test_anthropic_via_resolve_model_and_env(
    fake_provider: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_provider.script(FakeTurn(text="from env"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_provider.anthropic_base_url)
    model = resolve_model(f"anthropic:{ANTHROPIC_MODEL}")
    assert isinstance(model, AnthropicModel)
    assert model.name == f"anthropic:{ANTHROPIC_MODEL}"
    response = await model.complete(system=SYSTEM, messages=QUESTION, tools=())
    assert response.text == "from env"
    assert sent_api_key(only_request(fake_provider)) == "env-key"


# --- OpenAI ------------------------------------------------------------------------------------


async def test_openai_streams_text_deltas_in_order(fake_provider: FakeProvider) -> None:
    fake_provider.script(FakeTurn(text=["Hel", "lo", ", wor", "ld!"], input_tokens=7))
    deltas = Deltas()
    response = await openai_model(fake_provider).complete(
        system=SYSTEM, messages=QUESTION, tools=(), max_tokens=321, on_text=deltas
    )
    assert deltas.items == ["Hel", "lo", ", wor", "ld!"]
    assert response.text == "Hello, world!"
    assert response.tool_calls == ()
    assert response.stop_reason == "end_turn"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 5)
    assert response.model == OPENAI_MODEL

    request = only_request(fake_provider)
    assert request.provider == "openai"
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == OPENAI_MODEL
    assert body["max_completion_tokens"] == 321
    assert body["messages"] == [
        {"role": "system", "content": SYSTEM},  # the system prompt as the first message
        {"role": "user", "content": QUESTION[0].content},
    ]
    assert "tools" not in body
    assert "temperature" not in body


async def test_openai_tool_calls_accumulated_by_index(fake_provider: FakeProvider) -> None:
    fake_provider.script(TOOL_TURN)
    deltas = Deltas()
    response = await openai_model(fake_provider).complete(
        system=SYSTEM, messages=QUESTION, tools=(WEATHER, CLOCK), on_text=deltas
    )
    assert deltas.items == ["Checking ", "both ", "cities."]
    assert response.text == "Checking both cities."
    assert response.tool_calls == (
        ToolCall("tc_a", "weather", {"city": "Paris", "units": "metric"}),
        ToolCall("tc_b", "weather", {"city": "Rome", "days": [1, 2, 3]}),
    )
    assert response.stop_reason == "tool_use"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (120, 42)
    assert only_request(fake_provider).body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Current weather for a city.",
                "parameters": WEATHER.parameters,
            },
        },
        {
            "type": "function",
            "function": {
                "name": "clock",
                "description": "The current time.",
                "parameters": {"type": "object", "properties": {}},
            },
        },
    ]


async def test_openai_maps_history_with_tool_results(fake_provider: FakeProvider) -> None:
    fake_provider.script(FakeTurn(text="Paris is sunny; Rome is unknown."))
    response = await openai_model(fake_provider).complete(
        system=SYSTEM, messages=HISTORY, tools=(WEATHER,), temperature=0.25
    )
    assert response.text == "Paris is sunny; Rome is unknown."
    body = only_request(fake_provider).body
    assert body["temperature"] == 0.25
    messages: list[dict[str, Any]] = body["messages"]
    for item in messages:  # arguments are JSON text: compare them decoded
        for call in item.get("tool_calls", ()):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    assert messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION[0].content},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Paris"}},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Rome"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Error: unknown city 'Rome'"},
        {"role": "user", "content": "And tomorrow?"},
    ]


async def test_openai_invalid_tool_json_is_kept_raw(fake_provider: FakeProvider) -> None:
    fake_provider.script(
        FakeTurn(tool_calls=(FakeToolCall("weather", raw_arguments='{"city": "Par', id="t1"),)),
        FakeTurn(text="ok"),
    )
    model = openai_model(fake_provider)
    response = await model.complete(system="", messages=QUESTION, tools=(WEATHER,))
    assert response.tool_calls == (ToolCall("t1", "weather", '{"city": "Par'),)
    history = (
        *QUESTION,
        ChatMessage("assistant", tool_calls=response.tool_calls),
        ChatMessage("tool", "invalid JSON", tool_call_id="t1", name="weather", is_error=True),
    )
    await model.complete(system="", messages=history, tools=(WEATHER,))
    messages = fake_provider.requests[1].body["messages"]
    assert messages[0] == {"role": "user", "content": QUESTION[0].content}  # no system message
    assert messages[1]["content"] is None
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Par'


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [("max_tokens", "max_tokens"), ("refusal", "refusal"), ("end_turn", "end_turn")],
)
async def test_openai_finish_reasons_mapped(
    fake_provider: FakeProvider, stop_reason: str, expected: str
) -> None:
    fake_provider.script(FakeTurn(text="x", stop_reason=stop_reason))
    response = await openai_model(fake_provider).complete(
        system=SYSTEM, messages=QUESTION, tools=()
    )
    assert response.stop_reason == expected


@pytest.mark.parametrize("status", [400, 401, 500])
async def test_openai_http_error_is_model_error(fake_provider: FakeProvider, status: int) -> None:
    fake_provider.script(FakeTurn(status=status, error=f"scripted failure {status}"))
    with pytest.raises(ModelError, match=rf"HTTP {status}.*scripted failure {status}"):
        await openai_model(fake_provider).complete(system=SYSTEM, messages=QUESTION, tools=())
    assert fake_provider.count == 1


async def test_openai_retries_a_500(fake_provider: FakeProvider) -> None:
    fake_provider.script(FakeTurn(status=500, error="transient"), FakeTurn(text="recovered"))
    response = await openai_model(fake_provider, max_retries=1).complete(
        system=SYSTEM, messages=QUESTION, tools=()
    )
    assert response.text == "recovered"
    assert fake_provider.count == 2


async def test_openai_error_chunk_mid_stream(fake_provider: FakeProvider) -> None:
    # chunks: role, "a", "b", then an error object
    fake_provider.script(FakeTurn(text=["a", "b", "c"], fail_after=3, error="server melted"))
    deltas = Deltas()
    with pytest.raises(ModelError, match="server melted"):
        await openai_model(fake_provider).complete(
            system=SYSTEM, messages=QUESTION, tools=(), on_text=deltas
        )
    assert deltas.items == ["a", "b"]


async def test_openai_via_resolve_model_and_env(
    fake_provider: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_provider.script(FakeTurn(text="from env"))
    monkeypatch.setenv("OPENAI_BASE_URL", fake_provider.openai_base_url)
    model = resolve_model(f"openai:{OPENAI_MODEL}", get_api_key=lambda provider: f"{provider}-k")
    assert isinstance(model, OpenAIModel)
    assert model.name == f"openai:{OPENAI_MODEL}"
    response = await model.complete(system=SYSTEM, messages=QUESTION, tools=())
    assert response.text == "from env"
    assert only_request(fake_provider).headers["authorization"] == "Bearer openai-k"


# --- both ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_a_cut_stream_is_model_error(fake_provider: FakeProvider, provider: str) -> None:
    fake_provider.script(FakeTurn(text=["a", "b", "c"], cut_after=4))
    model = (
        anthropic_model(fake_provider) if provider == "anthropic" else openai_model(fake_provider)
    )
    with pytest.raises(ModelError, match="ended"):
        await model.complete(system=SYSTEM, messages=QUESTION, tools=())


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_on_text_errors_propagate_unchanged(
    fake_provider: FakeProvider, provider: str
) -> None:
    fake_provider.script(FakeTurn(text=["a", "b"]))
    model = (
        anthropic_model(fake_provider) if provider == "anthropic" else openai_model(fake_provider)
    )

    async def on_text(text: str) -> None:
        raise LookupError(f"consumer failed on {text!r}")

    with pytest.raises(LookupError, match="consumer failed on 'a'"):
        await model.complete(system=SYSTEM, messages=QUESTION, tools=(), on_text=on_text)


# --- resolution and connection errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ("anthropic:claude-x", "ANTHROPIC_API_KEY"),
        ("openai:gpt-x", "OPENAI_API_KEY"),
        ("gemini:pro", "unknown model provider 'gemini'"),
        ("claude-x", "provider:name"),
    ],
)
def test_resolve_model_errors(model: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        resolve_model(model)


def test_empty_api_key_is_model_error() -> None:
    with pytest.raises(ModelError, match="API key"):
        AnthropicModel("claude-x", api_key="")
    with pytest.raises(ModelError, match="API key"):
        OpenAIModel("gpt-x", api_key="")


async def test_unreachable_server_is_model_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    anthropic = AnthropicModel("claude-x", api_key=KEY, base_url=url, max_retries=0, timeout=5)
    with pytest.raises(ModelError, match="unreachable"):
        await anthropic.complete(system="", messages=QUESTION, tools=())
    openai = OpenAIModel("gpt-x", api_key=KEY, base_url=f"{url}/v1", max_retries=0, timeout=5)
    with pytest.raises(ModelError, match="unreachable"):
        await openai.complete(system="", messages=QUESTION, tools=())


async def test_tool_result_without_call_id_is_model_error(fake_provider: FakeProvider) -> None:
    history = (*QUESTION, ChatMessage("tool", "x", name="weather"))
    for model in (anthropic_model(fake_provider), openai_model(fake_provider)):
        with pytest.raises(ModelError, match="tool_call_id"):
            await model.complete(system="", messages=history, tools=())
    assert fake_provider.count == 0


# --- the fake itself: counting across restarts, by_round, process mode -------------------------


async def test_request_log_counts_across_fake_restarts(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    script = in_order(FakeTurn(text="first"), FakeTurn(text="second"))
    with running_fake(script, log_path=log) as fake:
        first = await anthropic_model(fake).complete(system="", messages=QUESTION, tools=())
        assert fake.count == 1
    with running_fake(script, log_path=log) as fake:  # a new server, same log
        second = await openai_model(fake).complete(system="", messages=QUESTION, tools=())
        assert fake.count == 2
        assert [r.index for r in fake.requests] == [1]
    assert (first.text, second.text) == ("first", "second")
    logged = read_request_log(log)
    assert [(r.index, r.provider) for r in logged] == [(0, "anthropic"), (1, "openai")]
    assert logged[0].body["messages"][0]["content"][0]["text"] == QUESTION[0].content


async def test_by_round_answers_a_repeated_call_the_same(fake_provider: FakeProvider) -> None:
    fake_provider.responder = by_round(
        FakeTurn(tool_calls=(FakeToolCall("weather", {"city": "Paris"}, id="w1"),)),
        FakeTurn(text="done"),
    )
    model = anthropic_model(fake_provider)
    one = await model.complete(system="", messages=QUESTION, tools=(WEATHER,))
    again = await model.complete(system="", messages=QUESTION, tools=(WEATHER,))
    assert one == again
    history = (
        *QUESTION,
        ChatMessage("assistant", tool_calls=one.tool_calls),
        ChatMessage("tool", "sunny", tool_call_id="w1", name="weather"),
    )
    final = await model.complete(system="", messages=history, tools=(WEATHER,))
    assert final.text == "done"
    assert fake_provider.count == 3


def test_fake_runs_as_a_process(tmp_path: Path) -> None:
    script = tmp_path / "turns.json"
    script.write_text(json.dumps([{"text": ["pro", "cess"]}, {"text": "second"}]))
    port_file = tmp_path / "port"
    log = tmp_path / "requests.jsonl"
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "tests.entities._fake_providers", "--script", str(script)]
    command += ["--log", str(log), "--port-file", str(port_file)]
    process = subprocess.Popen(command, cwd=root)
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert process.poll() is None, "the fake process exited"
            assert time.monotonic() < deadline, "the fake process did not start"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        model = AnthropicModel("claude-x", api_key=KEY, base_url=url, max_retries=0)
        response = asyncio.run(model.complete(system="", messages=QUESTION, tools=()))
        assert response.text == "process"
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert [r.provider for r in read_request_log(log)] == ["anthropic"]
