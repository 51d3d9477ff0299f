"""Badly framed chunked bodies, sent over a raw socket to a real uvicorn: at most one log line
each (uvicorn's own warning), never a traceback, and nothing is written; for the streams server
and the entities control plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx2

from entities import Runtime
from entities.server import create_app
from examples import all as examples_all
from tests._live import serving
from tests.streams._live_server import running_server

BAD_BODIES = [
    b"zz\r\nabc\r\n0\r\n\r\n",  # a chunk size that is not hex
    b"3\r\nabcdef\r\n0\r\n\r\n",  # a chunk longer than its size
    b"5\r\nab",  # cut short: the client goes away
]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if all(record is not seen for seen in self.records):  # it reaches several loggers
            self.records.append(record)


@contextlib.contextmanager
def capture() -> Iterator[Collect]:
    """Every record of uvicorn's loggers and of the root logger (where streams' propagate).
    Entered once the server runs: uvicorn's Config replaces its loggers' handlers."""
    handler = Collect()
    loggers = [
        logging.getLogger("uvicorn"),
        logging.getLogger("uvicorn.error"),
        logging.getLogger(),
    ]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


async def send_raw(base: str, target: str, body: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"PUT {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: application/json\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(4096), 0.5)
    except TimeoutError:
        answer = b""
    writer.close()
    await asyncio.sleep(0.2)  # the server notices and logs (or not)
    return answer


def check(logs: Collect, sent: int) -> None:
    assert not [r for r in logs.records if r.exc_info or "Traceback" in r.getMessage()], [
        r.getMessage() for r in logs.records
    ]
    loud = [r for r in logs.records if r.levelno >= logging.WARNING]
    assert len(loud) <= sent, [r.getMessage() for r in loud]


async def test_streams_server_logs_bad_chunked_bodies_in_one_line() -> None:
    with running_server("memory://") as live, capture() as logs:
        for body in BAD_BODIES:
            await send_raw(live.url, "/v1/stream/chunked", body)
        async with httpx2.AsyncClient() as http:
            assert (await http.head(live.stream("chunked"))).status_code == 404
    check(logs, len(BAD_BODIES))


async def test_entities_control_plane_logs_bad_chunked_bodies_in_one_line(
    tmp_path: Path,
) -> None:
    async with Runtime(examples_all.registry, f"sqlite:///{tmp_path / 'e.db'}") as runtime:
        async with serving(create_app(runtime)) as base:
            stack = contextlib.ExitStack()
            logs = stack.enter_context(capture())
            for body in BAD_BODIES:
                await send_raw(base, "/_entities/entities/counter/c1", body)
            async with httpx2.AsyncClient(base_url=base) as http:
                assert (await http.get("/_entities/entities")).json() == []
    stack.close()
    check(logs, len(BAD_BODIES))
