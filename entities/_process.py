"""Subprocess agents: any agent CLI as a durable entity (the agentproc protocol).

``Registry.define_process(name, command=[...])`` defines an entity type whose wakes run the
program once per inbox message. The bridge speaks agentproc wire 0.1 and wire 0.4 at once:

* input: the ``AGENT_*`` environment variables (wire 0.1) **and** one
  ``{"type": "turn", ...}`` JSON line on stdin, then EOF (wire 0.4). A 0.1 program ignores
  stdin, a 0.4 program ignores the environment;
* output: each stdout line is an ``AGENT_PARTIAL:`` / ``AGENT_SESSION:`` / ``AGENT_ERROR:``
  prefix line (0.1), a JSON object whose ``type`` is ``partial`` / ``result`` / ``error``
  (0.4), or else reply body text (0.1). stderr is log output; its tail is kept for failures.

What the entity does with a turn:

* partials are appended to the entity's stream as they arrive (``text_deltas``, keyed
  ``{wake_id}.{message_key}.{n}``), unless ``streaming=False`` (0.1: dropped entirely);
* the reply (the 0.4 ``result`` text, else the 0.1 body, else the streamed partials) is recorded
  with ``ctx.reply``, cut at ``max_reply_chars`` with :data:`TRUNCATION_MARKER`;
* the session id (0.1: the last ``AGENT_SESSION:`` wins; 0.4: the first non-empty
  ``session_id``) is stored in the ``sessions`` state collection and passed back next turn;
* the whole outcome of a completed turn is journaled (``ctx.step("process:<message key>")``):
  a re-run or replay of the wake reuses it and does not run the program again;
* failures fail the run: an error line raises :class:`AgentError` (the agent's text is the
  caller's reply once the wake is given up), a timeout (SIGTERM, ``kill_grace_s``, SIGKILL)
  raises :class:`ProcessTimeout` with exit code 124, any other non-zero exit raises
  :class:`ProcessFailed` with the stderr tail. A failed turn is journaled under its attempt
  (``process:<message key>:failed@<attempt>``), so with ``max_attempts > 1`` a retry runs the
  program again, while ``entities replay`` of the failed attempt fails the same way.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from subprocess import PIPE
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from ._errors import AgentError, ProcessFailed, ProcessTimeout, ReplayDivergence
from ._turns import (
    _AGENT_VARS,
    _ENV_REF,
    DRAIN_AFTER_EXIT_S,
    EXIT_ERROR,
    EXIT_SUCCESS,
    EXIT_TIMEOUT,
    STDERR_TAIL_CHARS,
    STDERR_WINDOW,
    TRUNCATION_MARKER,
    WIRE_01,
    WIRE_04,
    CompletedTurn,
    ProcessSession,
    ProcessSpec,
    Turn,
    TurnResult,
    classify_line,
)

if TYPE_CHECKING:
    from anyio.abc import ByteReceiveStream, Process

    from ._context import HandlerContext
    from ._wake import InboxMessage, WakeEvent

__all__ = ["ProcessAgent", "run_turn"]

logger = logging.getLogger("entities.process")


# -- running one turn ---------------------------------------------------------------------------


def _substitute(value: str, turn: Turn) -> str:
    return (
        value.replace("{{MESSAGE}}", turn.message)
        .replace("{{SESSION_ID}}", turn.session_id)
        .replace("{{SESSION_NAME}}", turn.session_name)
    )


def _expand(value: str, allowlist: frozenset[str] | None) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if allowlist is not None and name not in allowlist:
            logger.warning("env_allowlist blocked ${%s}; it expands to an empty string", name)
            return ""
        return os.environ.get(name, "")

    return _ENV_REF.sub(replace, value)


def _environment(spec: ProcessSpec, turn: Turn) -> dict[str, str]:
    """The child's environment: the worker's, then the spec's ``env`` (``${VAR}`` expanded
    against the worker's environment, limited by ``env_allowlist``), then the ``AGENT_*``
    variables of wire 0.1."""
    env = {k: v for k, v in os.environ.items() if k not in _AGENT_VARS}
    for key, value in spec.env.items():
        env[key] = _expand(_substitute(str(value), turn), spec.env_allowlist)
    env.update(
        AGENT_MESSAGE=turn.message,
        AGENT_SESSION_ID=turn.session_id,
        AGENT_SESSION_NAME=turn.session_name,
        AGENT_FROM_USER=turn.from_user,
        AGENT_STREAMING="1" if spec.streaming else "0",
        AGENT_PROTOCOL_VERSION=WIRE_01,
    )
    if turn.image_url:
        env["AGENT_IMAGE_URL"] = turn.image_url
    if turn.file_url:
        env["AGENT_FILE_URL"] = turn.file_url
    if turn.attachments:
        env["AGENT_ATTACHMENTS"] = orjson.dumps([dict(a) for a in turn.attachments]).decode()
    return env


def _turn_line(turn: Turn) -> bytes:
    data: dict[str, Any] = {
        "type": "turn",
        "message": turn.message,
        "session_id": turn.session_id,
        "session_name": turn.session_name,
        "protocol_version": WIRE_04,
    }
    if turn.attachments:
        data["attachments"] = [dict(a) for a in turn.attachments]
    return orjson.dumps(data) + b"\n"


def _exit_code(returncode: int | None) -> int:
    if returncode is None:
        return EXIT_ERROR
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: Process, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except (ProcessLookupError, OSError):
            pass


async def _lines(stream: ByteReceiveStream) -> AsyncIterator[str]:
    """Yield the decoded lines of ``stream`` (without line ends) until EOF."""
    pending: list[bytes] = []  # the pieces of an unfinished line
    while True:
        try:
            chunk = await stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            break
        *complete, rest = chunk.split(b"\n")
        for raw in complete:
            if pending:
                raw, pending = b"".join([*pending, raw]), []
            yield raw.decode("utf-8", errors="replace").rstrip("\r")
        if rest:
            pending.append(rest)
    if pending:
        yield b"".join(pending).decode("utf-8", errors="replace").rstrip("\r")


class _Collector:
    """Folds classified stdout lines into a :class:`TurnResult`."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.body: list[str] = []
        self.result_text: str | None = None
        self.session_01 = ""  # the last AGENT_SESSION: wins
        self.session_04 = ""  # the first non-empty session_id wins
        self.error = ""
        self.partials: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line; return a partial to forward now, if any."""
        kind, value, session = classify_line(line)
        if session and not self.session_04:
            self.session_04 = session
        if kind == "session":
            self.session_01 = value
            return None
        if kind == "error":
            if not self.error:
                self.error = value or "agent error"
            return None
        if self.error:  # anything after an error is discarded
            logger.debug("discarding %s line after an error line", kind)
            return None
        if kind == "partial":
            if self.streaming and value:
                self.partials.append(value)
                return value
            return None
        if kind == "result":
            if self.result_text is None:
                self.result_text = value
            return None
        self.body.append(value)
        return None

    def reply(self) -> str:
        if self.error:
            return ""
        if self.result_text is not None:
            return self.result_text
        body = "\n".join(self.body)
        if not body.strip() and self.partials:
            return "".join(self.partials)  # everything went out as partials
        return body


class _TurnRun:
    """One run of the program for a turn: the process and what its helper tasks share.

    :meth:`supervise` runs one task per concern (write the turn to stdin, read stdout, read
    stderr, the timeout watchdog, the drain after exit) and forwards partials from the calling
    task; :meth:`result` folds what they saw into a :class:`TurnResult`.
    """

    def __init__(self, spec: ProcessSpec, turn: Turn, proc: Process, name: str) -> None:
        self.spec = spec
        self.turn = turn
        self.proc = proc
        self.name = name  # argv[0], for the log
        self.collector = _Collector(spec.streaming)
        self.stderr_window = bytearray()
        self.timed_out = False
        self.stdout_done = anyio.Event()
        self.stderr_done = anyio.Event()
        self.send, self.receive = anyio.create_memory_object_stream[str](max_buffer_size=math.inf)

    async def write_turn(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            await stdin.send(_turn_line(self.turn))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # a wire-0.1 program may exit without reading stdin
        finally:
            try:
                await stdin.aclose()
            except (anyio.BrokenResourceError, OSError):
                pass

    async def read_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            async for line in _lines(stdout):
                forward = self.collector.feed(line)
                if forward is not None:
                    try:
                        self.send.send_nowait(forward)
                    except anyio.ClosedResourceError:
                        pass  # the turn is over (a grandchild kept the pipe open)
        finally:
            self.stdout_done.set()
            self.send.close()

    async def read_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        window = self.stderr_window
        try:
            async for line in _lines(stderr):
                logger.debug("agent stderr: %s", line)
                window.extend(line.encode() + b"\n")
                if len(window) > STDERR_WINDOW:
                    del window[: len(window) - STDERR_WINDOW]
        finally:
            self.stderr_done.set()

    async def watchdog(self) -> None:
        """Past ``timeout_s``: SIGTERM the process group, then SIGKILL after ``kill_grace_s``."""
        proc, spec = self.proc, self.spec
        with anyio.move_on_after(spec.timeout_s):
            await proc.wait()
            return
        self.timed_out = True
        logger.warning("%s ran past %s s: SIGTERM", self.name, spec.timeout_s)
        _signal_group(proc, signal.SIGTERM)
        with anyio.move_on_after(spec.kill_grace_s):
            await proc.wait()
            return
        logger.warning("%s ignored SIGTERM for %s s: SIGKILL", self.name, spec.kill_grace_s)
        _signal_group(proc, signal.SIGKILL)
        await proc.wait()

    async def drain_after_exit(self) -> None:
        await self.proc.wait()
        # A grandchild may hold the pipes open: give them a moment, then stop reading.
        with anyio.move_on_after(DRAIN_AFTER_EXIT_S):
            await self.stdout_done.wait()
            await self.stderr_done.wait()
        self.send.close()

    async def forward_partials(
        self, on_partial: Callable[[str], Awaitable[None]] | None
    ) -> BaseException | None:
        """Await ``on_partial`` for each partial until the stream closes; return what it
        raised (other than cancellation), after killing the process group, or ``None``."""
        async with self.receive:
            async for text in self.receive:
                if on_partial is None:
                    continue
                try:
                    await on_partial(text)
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:
                    _signal_group(self.proc, signal.SIGKILL)
                    return exc
        return None

    async def supervise(self, on_partial: Callable[[str], Awaitable[None]] | None) -> None:
        """Run the helpers until the program has exited; on the way out (also when cancelled)
        kill the process group if it still runs, and close the process.

        Raises:
            Whatever ``on_partial`` raises (the program is then killed).
        """
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.write_turn)
                tg.start_soon(self.read_stderr)
                tg.start_soon(self.watchdog)
                tg.start_soon(self.drain_after_exit)
                tg.start_soon(self.read_stdout)
                # Partials are forwarded from this task, and what ``on_partial`` raises (e.g. a
                # lost lease) is re-raised as itself once the helpers are stopped.
                error = await self.forward_partials(on_partial)
                await self.proc.wait()
                tg.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            if self.proc.returncode is None:
                _signal_group(self.proc, signal.SIGKILL)
                with anyio.CancelScope(shield=True):
                    await self.proc.wait()
            with anyio.CancelScope(shield=True):
                await self.proc.aclose()

    def exit_code(self) -> int:
        """The turn's exit code: 124 on timeout, at least 1 after an error line."""
        code = _exit_code(self.proc.returncode)
        if self.timed_out:
            return EXIT_TIMEOUT
        if self.collector.error:
            return EXIT_ERROR if code == EXIT_SUCCESS else code
        return code

    def result(self, started: float) -> TurnResult:
        """The :class:`TurnResult` of the finished run (``started``: its ``time.monotonic()``)."""
        collector = self.collector
        result = TurnResult(
            timed_out=self.timed_out,
            session_id=collector.session_01 or collector.session_04,
            error=collector.error,
            partials=list(collector.partials),
            stderr_tail=self.stderr_window.decode("utf-8", errors="replace")[-STDERR_TAIL_CHARS:],
        )
        result.exit_code = self.exit_code()
        reply = collector.reply() if result.ok else ""
        if len(reply) > self.spec.max_reply_chars:
            reply = reply[: self.spec.max_reply_chars] + TRUNCATION_MARKER
            result.truncated = True
        result.reply = reply
        result.duration_ms = round((time.monotonic() - started) * 1000, 3)
        logger.info(
            "%s exited %d%s in %.0f ms",
            self.name,
            result.exit_code,
            " (timed out)" if self.timed_out else "",
            result.duration_ms,
        )
        return result


def _start_failure(name: str, exc: OSError, started: float) -> TurnResult:
    logger.warning("cannot start %s: %s", name, exc)
    return TurnResult(
        exit_code=EXIT_ERROR,
        stderr_tail=f"failed to start {name!r}: {exc}",
        duration_ms=round((time.monotonic() - started) * 1000, 3),
    )


async def run_turn(
    spec: ProcessSpec,
    turn: Turn,
    *,
    on_partial: Callable[[str], Awaitable[None]] | None = None,
) -> TurnResult:
    """Run the program once for ``turn`` and return what it produced.

    ``on_partial`` is awaited for each partial as it arrives (not when ``spec.streaming`` is
    off). The result carries the failure instead of raising it: check :attr:`TurnResult.ok`.
    The program runs in its own process group; when this call is cancelled the group is killed.

    Raises:
        Whatever ``on_partial`` raises (the program is then killed).
    """
    started = time.monotonic()
    argv = [_substitute(a, turn) for a in spec.command]
    try:
        proc = await anyio.open_process(
            argv,
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
            cwd=spec.cwd,
            env=_environment(spec, turn),
            start_new_session=True,
        )
    except OSError as exc:
        return _start_failure(argv[0], exc, started)
    logger.debug("started %s (pid %d)", argv, proc.pid)
    run = _TurnRun(spec, turn, proc, argv[0])
    await run.supervise(on_partial)
    return run.result(started)


# -- the entity type ----------------------------------------------------------------------------


def _text_of(message: InboxMessage) -> str:
    text = message.text
    if text is not None:
        return text
    if message.payload is None:
        return ""
    return orjson.dumps(message.payload).decode()


def _field(payload: Any, name: str) -> Any:
    return payload.get(name) if isinstance(payload, dict) else None


def _for_process(attachment: dict[str, Any]) -> dict[str, Any]:
    """A message's attachment as the agent sees it: a stream reference gets ``url``, the
    stream's path on the entities server (``/v1/stream/...``), so entries always have one."""
    if "url" in attachment:
        return dict(attachment)
    return {**attachment, "url": f"/v1/stream{attachment['stream']}"}


class ProcessAgent:
    """The handler and ``on_error`` hook of a process entity type (see the module docs)."""

    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec

    def turn_for(self, message: InboxMessage, session_id: str, session_name: str) -> Turn:
        """The :class:`Turn` for an inbox message: its text (or its JSON payload), its
        attachments (the message's, then those of the payload's ``attachments`` list),
        ``image_url`` and ``file_url`` (the payload's, else the first image and file
        attached)."""
        payload = message.payload
        attachments = _field(payload, "attachments")
        image_url = _field(payload, "image_url")
        file_url = _field(payload, "file_url")
        sent = [_for_process(a) for a in message.attachments]
        if not image_url:
            image_url = next((a["url"] for a in sent if a["type"] == "image"), "")
        if not file_url:
            file_url = next((a["url"] for a in sent if a["type"] == "file"), "")
        in_payload = (
            [a for a in attachments if isinstance(a, dict)] if isinstance(attachments, list) else []
        )
        return Turn(
            message=_text_of(message),
            session_id=session_id,
            session_name=session_name,
            from_user=message.sender or "",
            attachments=(*sent, *in_payload),
            image_url=image_url if isinstance(image_url, str) else "",
            file_url=file_url if isinstance(file_url, str) else "",
        )

    async def handle(self, ctx: HandlerContext, wake: WakeEvent) -> None:
        """Run the program once per inbox message of the wake (a journaled step each).

        Raises:
            AgentError: the agent sent an error line.
            ProcessTimeout: the agent ran past ``timeout_s``.
            ProcessFailed: the agent could not start or exited non-zero.
        """
        completed: list[CompletedTurn] = []
        sessions = ctx.state.sessions
        for message in wake.messages:
            name = _field(message.payload, "session_name")
            session_name = name if isinstance(name, str) and name else "default"
            row = sessions.get(session_name)
            turn = self.turn_for(message, row.session_id if row else "", session_name)
            result = await self._journaled_turn(ctx, wake, message, turn)
            if not result.ok:
                raise _failure(result, message.key, completed)
            ctx.reply(result.reply, to=message)
            if result.session_id:
                sessions.upsert(
                    ProcessSession(
                        key=session_name, session_id=result.session_id, updated_at=ctx.now()
                    )
                )
            completed.append(
                CompletedTurn(message.key, result.reply, session_name, result.session_id)
            )

    async def _journaled_turn(
        self, ctx: HandlerContext, wake: WakeEvent, message: InboxMessage, turn: Turn
    ) -> TurnResult:
        """Run ``turn`` (for ``message``) as a journaled step and return its result, failed or
        not: a journaled outcome is reused instead of running the program again."""
        on_partial = _partial_sink(ctx, wake, message)

        async def run() -> dict[str, Any]:
            outcome = await run_turn(self.spec, turn, on_partial=on_partial)
            if not outcome.ok:
                raise _TurnFailed(outcome)
            return outcome.to_json()

        # A completed turn is journaled under one id for every attempt: a retry or a
        # redelivery reuses it. A failed one is journaled under this attempt's id (so a
        # retry runs the program again, and a replay of the failed attempt fails alike).
        failed_id = f"process:{message.key}:failed@{wake.attempt}"
        try:
            data = await ctx.step(f"process:{message.key}", run)
        except _TurnFailed as exc:
            failed = exc.result.to_json()
            data = await ctx.step(failed_id, functools.partial(dict, failed))
        except ReplayDivergence:  # replaying a failed attempt: its failure was recorded
            data = await ctx.step(failed_id, _not_recorded)
        return TurnResult.from_json(data)

    async def on_error(self, ctx: HandlerContext, error: BaseException) -> None:
        """When a wake is given up: keep the replies and sessions of the turns that completed
        before the failure, and answer an :class:`AgentError` with ``{"error": text}``."""
        if not isinstance(error, ProcessFailed):
            return
        for done in error.completed:
            ctx.reply(done.reply, to=done.message_key)
            if done.session_id:
                ctx.state.sessions.upsert(
                    ProcessSession(
                        key=done.session_name, session_id=done.session_id, updated_at=ctx.now()
                    )
                )
        if isinstance(error, AgentError) and error.message_key is not None:
            ctx.reply({"error": error.user_message}, to=error.message_key)


def _partial_sink(
    ctx: HandlerContext, wake: WakeEvent, message: InboxMessage
) -> Callable[[str], Awaitable[None]]:
    """An ``on_partial`` that appends each partial of ``message``'s turn to the entity's
    ``text_deltas`` stream, keyed ``{wake_id}.{message_key}.{n}``."""
    count = 0

    async def on_partial(text: str) -> None:
        nonlocal count
        count += 1
        await ctx.append_live(
            "text_deltas",
            f"{wake.wake_id}.{message.key}.{count}",
            {
                "run_id": ctx.run_id,
                "in_reply_to": message.key,
                "attempt": wake.attempt,
                "seq": count,
                "delta": text,
            },
        )

    return on_partial


class _TurnFailed(Exception):
    def __init__(self, result: TurnResult) -> None:
        super().__init__(result.error or f"exit {result.exit_code}")
        self.result = result


def _not_recorded() -> Any:
    raise AssertionError("unreachable: a replay never calls a step")  # pragma: no cover


def _failure(result: TurnResult, message_key: str, completed: Sequence[CompletedTurn]) -> Exception:
    tail = result.stderr_tail.strip()
    if result.timed_out:
        return ProcessTimeout(
            f"agent timed out (exit {result.exit_code})"
            + (f"; stderr tail:\n{tail}" if tail else ""),
            result,
            message_key=message_key,
            completed=completed,
        )
    if result.error:
        return AgentError(
            f"agent error (exit {result.exit_code}): {result.error}",
            result,
            message_key=message_key,
            completed=completed,
        )
    return ProcessFailed(
        f"agent exited with code {result.exit_code} without an error line; "
        + (f"stderr tail:\n{tail}" if tail else "no stderr output"),
        result,
        message_key=message_key,
        completed=completed,
    )
