"""SSE framing: any payload survives an independent SSE parser and cannot forge an event."""

from __future__ import annotations

import base64
import re

import httpx2
import orjson
from hypothesis import given
from hypothesis import strategies as st

import streams
from streams.server._sse import control_event, data_event

httpx2.alias_httpx()  # httpx_sse imports `httpx`; make that name resolve to httpx2

from httpx_sse._decoders import SSEDecoder, SSELineDecoder  # noqa: E402


def parse(raw: bytes) -> list[tuple[str, str]]:
    """Events as a browser would see them (httpx_sse's decoder, fed in small pieces)."""
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    events: list[tuple[str, str]] = []
    text = raw.decode()
    for start in range(0, len(text), 7):
        for line in lines.decode(text[start : start + 7]):
            event = decoder.decode(line)
            if event is not None:
                events.append((event.event, event.data))
    return events


def read_result(*payloads: bytes, closed: bool = False) -> streams.ReadResult:
    messages = [
        streams.Message(streams.format_offset(i + 1), data) for i, data in enumerate(payloads)
    ]
    tail = streams.format_offset(len(payloads))
    return streams.ReadResult(messages, tail, True, closed)


@given(st.lists(st.text(), min_size=1, max_size=4))
def test_text_payloads_round_trip_and_never_forge_events(texts: list[str]) -> None:
    result = read_result(*(text.encode() for text in texts))
    events = parse(data_event(result, "text") + control_event(result, None))
    assert [kind for kind, _ in events] == ["data", "control"]
    # SSE carries line breaks as line boundaries: every \r\n, \r or \n arrives as \n
    assert events[0][1] == re.sub(r"\r\n|\r", "\n", "".join(texts))
    control = orjson.loads(events[1][1])
    assert control["streamNextOffset"] == result.next_offset
    assert control["upToDate"] is True


@given(st.lists(st.binary(), min_size=1, max_size=4))
def test_binary_payloads_are_one_base64_event(chunks: list[bytes]) -> None:
    result = read_result(*chunks, closed=True)
    events = parse(data_event(result, "base64") + control_event(result, None))
    assert [kind for kind, _ in events] == ["data", "control"]
    assert len(events[0][1]) % 4 == 0
    assert base64.b64decode(events[0][1]) == b"".join(chunks)
    control = orjson.loads(events[1][1])
    assert control["streamClosed"] is True and "streamCursor" not in control


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(st.lists(json_values, min_size=1, max_size=4))
def test_json_payloads_arrive_as_one_array(values: list[object]) -> None:
    result = read_result(*(orjson.dumps(value) for value in values))
    events = parse(data_event(result, "json") + control_event(result, 7))
    assert [kind for kind, _ in events] == ["data", "control"]
    assert orjson.loads(events[0][1]) == values
    assert int(orjson.loads(events[1][1])["streamCursor"]) > 7
