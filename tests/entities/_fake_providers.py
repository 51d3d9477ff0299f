"""A local fake of the Anthropic and OpenAI HTTP APIs, speaking their streaming wire formats.

One Starlette app serves both ``POST /v1/messages`` (Anthropic Messages, ``stream: true``: SSE
``message_start``, ``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``,
``message_stop``) and ``POST /v1/chat/completions`` (OpenAI Chat Completions: ``data:``
``chat.completion.chunk`` lines, a usage chunk, ``data: [DONE]``), so the real SDKs can be
pointed at it through ``base_url`` (:attr:`FakeProvider.anthropic_base_url`,
:attr:`FakeProvider.openai_base_url`) or ``ANTHROPIC_BASE_URL`` / ``OPENAI_BASE_URL``.

What it answers is scripted with :class:`FakeTurn` items (text deltas, tool calls, usage, an error
status, delays) chosen by a *responder*: :func:`in_order` (the n-th request gets the n-th turn) or
:func:`by_round` (chosen by how many assistant messages the request's conversation holds, so a
repeated call gets the same answer). Every request is recorded (:attr:`FakeProvider.requests`,
:attr:`FakeProvider.count`) and, with ``log_path``, appended as one JSON line to a file, so calls
made across restarts (of the client process or of the fake itself) can be counted
(:func:`read_request_log`).

Use :func:`running_fake` (a real uvicorn on a free 127.0.0.1 port in a background thread), the
``fake_provider`` fixture, or run it as a process::

    python -m tests.entities._fake_providers --script turns.json --log requests.jsonl \
        --port-file port.txt [--by-round]

where ``turns.json`` is a list of :class:`FakeTurn` fields (tool calls as objects).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests._live import serving_in_thread

__all__ = [
    "FakeProvider",
    "FakeToolCall",
    "FakeTurn",
    "RecordedRequest",
    "Responder",
    "by_round",
    "fake_provider",
    "in_order",
    "read_request_log",
    "running_fake",
]

Provider = Literal["anthropic", "openai"]


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call the fake model makes.

    ``arguments`` is JSON-encoded and streamed in several pieces; ``raw_arguments`` (if set) is
    streamed verbatim instead (to send invalid JSON). ``id`` defaults to a per-request id.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw_arguments: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class FakeTurn:
    """One scripted answer.

    ``text``: a list of text deltas streamed in that order, or a string split into word deltas.
    ``stop_reason`` is in the neutral (Anthropic) vocabulary; default ``tool_use`` when there
    are tool calls, else ``end_turn``. ``status`` other than 200 answers an HTTP error whose
    message is ``error``. ``fail_after`` sends a provider error event after that many events
    of a successful stream; ``cut_after`` ends the stream there without one (a dropped
    connection). ``delay`` waits before answering, ``chunk_delay`` between events.
    ``pause_after`` holds the stream after that many events until ``resume`` is set (a test
    looks at the partial answer meanwhile).
    """

    text: str | Sequence[str] = ""
    tool_calls: Sequence[FakeToolCall] = ()
    input_tokens: int = 10
    output_tokens: int = 5
    stop_reason: str | None = None
    status: int = 200
    error: str = "fake provider error"
    fail_after: int | None = None
    cut_after: int | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    pause_after: int | None = None
    resume: threading.Event | None = field(default=None, compare=False)
    reasoning: str | Sequence[str] = ""  # streamed before the text (thinking / reasoning)
    signature: str = "sig-fake"  # of the Anthropic thinking block

    def deltas(self) -> list[str]:
        if isinstance(self.text, str):
            return re.findall(r"\S+\s*|\s+", self.text)
        return [t for t in self.text if t]

    def reasoning_deltas(self) -> list[str]:
        if isinstance(self.reasoning, str):
            return re.findall(r"\S+\s*|\s+", self.reasoning)
        return [t for t in self.reasoning if t]

    def stop(self) -> str:
        return self.stop_reason or ("tool_use" if self.tool_calls else "end_turn")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FakeTurn:
        data = dict(data)
        calls = tuple(FakeToolCall(**c) for c in data.pop("tool_calls", ()))
        return cls(tool_calls=calls, **data)


@dataclass(frozen=True)
class RecordedRequest:
    """A request the fake received; ``index`` counts from 0 over the whole log."""

    index: int
    provider: Provider
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def assistant_turns(self) -> int:
        """How many assistant messages the request's conversation holds."""
        return sum(
            1
            for m in self.body.get("messages") or ()
            if isinstance(m, dict) and m.get("role") == "assistant"
        )


Responder = Callable[[RecordedRequest], FakeTurn]


def in_order(*turns: FakeTurn) -> Responder:
    """The request with ``index`` n gets ``turns[n]``; past the end, an HTTP 400 error."""

    def respond(request: RecordedRequest) -> FakeTurn:
        if request.index < len(turns):
            return turns[request.index]
        return FakeTurn(status=400, error=f"fake script exhausted ({len(turns)} turns)")

    return respond


def by_round(*turns: FakeTurn) -> Responder:
    """The turn picked by how many assistant messages the request holds (a repeated call with
    the same conversation gets the same answer); past the end, an HTTP 400 error."""

    def respond(request: RecordedRequest) -> FakeTurn:
        n = request.assistant_turns
        if n < len(turns):
            return turns[n]
        return FakeTurn(status=400, error=f"fake script has no turn for round {n}")

    return respond


def _no_script(request: RecordedRequest) -> FakeTurn:
    return FakeTurn(status=400, error="fake provider: no script set")


def read_request_log(path: Path) -> list[RecordedRequest]:
    """The requests recorded in a ``log_path`` file (by any process), in order."""
    if not path.exists():
        return []
    result = []
    for line in path.read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            result.append(RecordedRequest(**data))
    return result


class FakeProvider:
    """The fake's state: the responder, and the requests received (thread-safe)."""

    def __init__(self, responder: Responder | None = None, *, log_path: Path | None = None):
        self.responder: Responder = responder or _no_script
        self.log_path = log_path
        self.url = ""  # http://127.0.0.1:PORT once running
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._next_index = len(read_request_log(log_path)) if log_path else 0
        self.app = Starlette(
            routes=[
                Route("/v1/messages", self._anthropic, methods=["POST"]),
                Route("/v1/chat/completions", self._openai, methods=["POST"]),
            ]
        )

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def script(self, *turns: FakeTurn) -> None:
        """Answer with ``turns`` in order (see :func:`in_order`)."""
        self.responder = in_order(*turns)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests this instance received."""
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        """Requests received: over the whole log file with ``log_path``, else by this instance."""
        with self._lock:
            return self._next_index if self.log_path else len(self._requests)

    async def _record(self, provider: Provider, request: Request) -> RecordedRequest:
        body = json.loads(await request.body() or b"{}")
        with self._lock:
            recorded = RecordedRequest(
                self._next_index,
                provider,
                request.url.path,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
            self._next_index += 1
            self._requests.append(recorded)
            if self.log_path is not None:
                with self.log_path.open("a") as f:
                    f.write(json.dumps(recorded.to_json()) + "\n")
        return recorded

    async def _anthropic(self, request: Request) -> Response:
        recorded = await self._record("anthropic", request)
        turn = self.responder(recorded)
        if turn.delay:
            await asyncio.sleep(turn.delay)
        if turn.status != 200:
            return _anthropic_error(turn.status, turn.error)
        if recorded.body.get("stream") is not True:
            return _anthropic_error(400, "the fake answers streaming requests only")
        events = _anthropic_events(turn, recorded)
        return StreamingResponse(_sse(events, turn), media_type="text/event-stream")

    async def _openai(self, request: Request) -> Response:
        recorded = await self._record("openai", request)
        turn = self.responder(recorded)
        if turn.delay:
            await asyncio.sleep(turn.delay)
        if turn.status != 200:
            return _openai_error(turn.status, turn.error)
        if recorded.body.get("stream") is not True:
            return _openai_error(400, "the fake answers streaming requests only")
        events = _openai_events(turn, recorded)
        return StreamingResponse(_sse(events, turn), media_type="text/event-stream")


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _anthropic_error(status: int, message: str) -> Response:
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return JSONResponse(
        {"type": "error", "error": {"type": kind, "message": message}},
        status_code=status,
        headers={"retry-after-ms": "10"},
    )


def _openai_error(status: int, message: str) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        status_code=status,
        headers={"retry-after-ms": "10"},
    )


# One SSE event: (event name or None, data as JSON or a literal string).
_Event = tuple[str | None, dict[str, Any] | str]


async def _sse(events: list[_Event], turn: FakeTurn) -> AsyncIterator[bytes]:
    for n, (name, data) in enumerate(events):
        if turn.fail_after is not None and n == turn.fail_after:
            yield _frame(*_stream_error(name, turn.error))
            return
        if turn.cut_after is not None and n == turn.cut_after:
            return
        if n and turn.chunk_delay:
            await asyncio.sleep(turn.chunk_delay)
        if n == turn.pause_after and turn.resume is not None:
            await asyncio.to_thread(turn.resume.wait)  # set from the test's thread
        yield _frame(name, data)


def _stream_error(first_event_name: str | None, message: str) -> _Event:
    if first_event_name is None:  # OpenAI: an error object as a data line
        return None, {"error": {"message": message, "type": "server_error", "code": None}}
    return "error", {"type": "error", "error": {"type": "overloaded_error", "message": message}}


def _frame(name: str | None, data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {payload}\n\n".encode()


def _json_pieces(raw: str, parts: int = 3) -> list[str]:
    """``raw`` cut into up to ``parts`` consecutive non-empty pieces."""
    if not raw:
        return []
    size = max(1, -(-len(raw) // parts))
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def _arguments(call: FakeToolCall) -> str:
    return call.raw_arguments if call.raw_arguments is not None else json.dumps(call.arguments)


def _anthropic_events(turn: FakeTurn, request: RecordedRequest) -> list[_Event]:
    model = str(request.body.get("model", "claude-fake"))
    events: list[_Event] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": f"msg_fake_{request.index}",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": turn.input_tokens, "output_tokens": 1},
                },
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    index = 0
    thoughts = turn.reasoning_deltas()
    if thoughts:
        start = {"type": "thinking", "thinking": "", "signature": ""}
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
        )
        for text in thoughts:
            delta = {"type": "thinking_delta", "thinking": text}
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        signature = {"type": "signature_delta", "signature": turn.signature}
        events.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": signature},
            )
        )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    deltas = turn.deltas()
    if deltas:
        events.append(
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        for text in deltas:
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": text},
                    },
                )
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    for k, call in enumerate(turn.tool_calls):
        block = {
            "type": "tool_use",
            "id": call.id or f"toolu_fake_{request.index}_{k}",
            "name": call.name,
            "input": {},
        }
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        for piece in ["", *_json_pieces(_arguments(call))]:  # the API opens with an empty one
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece},
                    },
                )
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": turn.stop(), "stop_sequence": None},
                "usage": {"output_tokens": turn.output_tokens},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


_OPENAI_FINISH = {
    "end_turn": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "refusal": "content_filter",
}


def _openai_events(turn: FakeTurn, request: RecordedRequest) -> list[_Event]:
    base = {
        "id": f"chatcmpl-fake-{request.index}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": str(request.body.get("model", "gpt-fake")),
        "system_fingerprint": "fp_fake",
    }
    options = request.body.get("stream_options") or {}
    with_usage = bool(options.get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> _Event:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        data: dict[str, Any] = {**base, "choices": [choice]}
        if with_usage:
            data["usage"] = None
        return None, data

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    for text in turn.reasoning_deltas():  # as OpenAI-compatible reasoning endpoints send it
        events.append(chunk({"reasoning_content": text}))
    for text in turn.deltas():
        events.append(chunk({"content": text}))
    for k, call in enumerate(turn.tool_calls):
        opening = {
            "index": k,
            "id": call.id or f"call_fake_{request.index}_{k}",
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        events.append(chunk({"tool_calls": [opening]}))
        for piece in _json_pieces(_arguments(call)):
            events.append(chunk({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}))
    events.append(chunk({}, _OPENAI_FINISH.get(turn.stop(), turn.stop())))
    if with_usage:
        usage = {
            "prompt_tokens": turn.input_tokens,
            "completion_tokens": turn.output_tokens,
            "total_tokens": turn.input_tokens + turn.output_tokens,
        }
        events.append((None, {**base, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return events


@contextlib.contextmanager
def running_fake(
    responder: Responder | None = None,
    *,
    log_path: Path | None = None,
    port: int = 0,
) -> Iterator[FakeProvider]:
    """Serve a :class:`FakeProvider` on 127.0.0.1 (``port`` 0: a free one) until the block
    exits; uvicorn runs in a background thread with its own event loop
    (:func:`tests._live.serving_in_thread`).

    Raises:
        RuntimeError: uvicorn did not start or stop within 20 s.
    """
    fake = FakeProvider(responder, log_path=log_path)
    with serving_in_thread(fake.app, port=port) as url:
        fake.url = url
        yield fake


@pytest.fixture
def fake_provider(tmp_path: Path) -> Iterator[FakeProvider]:
    """A running fake (no script yet: call ``.script(...)`` or set ``.responder``); requests are
    also logged to ``tmp_path / "fake-provider-requests.jsonl"``."""
    with running_fake(log_path=tmp_path / "fake-provider-requests.jsonl") as fake:
        yield fake


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake as a process until SIGINT/SIGTERM (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--script", type=Path, required=True, help="JSON list of FakeTurn")
    parser.add_argument("--log", type=Path, help="append each request as a JSON line here")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="write the bound port here")
    parser.add_argument("--by-round", action="store_true", help="pick turns by conversation")
    args = parser.parse_args(argv)
    turns = [FakeTurn.from_json(t) for t in json.loads(args.script.read_text())]
    responder = by_round(*turns) if args.by_round else in_order(*turns)
    fake = FakeProvider(responder, log_path=args.log)
    config = uvicorn.Config(fake.app, host="127.0.0.1", port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())  # serve() handles SIGINT / SIGTERM
        while not server.started:
            if task.done():
                await task
                raise SystemExit(1)
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        if args.port_file:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(bound))
            tmp.replace(args.port_file)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()
