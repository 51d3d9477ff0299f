"""A writer process killed with SIGKILL mid-stream loses no acknowledged append, half-writes none.

The child appends batches from many concurrent tasks and prints every acknowledged
``(task, batch, size, next_offset)`` as soon as its append returns. After SIGKILL the parent
reopens the file and checks every acknowledged batch is there, byte-exact, at its offset, and that
the stream holds only whole batches.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import streams
from streams import format_offset

pytestmark = pytest.mark.slow

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    import streams

    def payload(task, batch, index):
        # Varied sizes (some over a page) so torn writes would show.
        body = f"{task}:{batch}:{index}:".encode()
        return body + bytes([(task * 31 + batch * 7 + index) % 256]) * ((task + batch) % 7 * 700)

    path = sys.argv[3]
    first_task = int(sys.argv[4])  # task ids are first_task, first_task + 1, ...

    async def writer(store, task):
        batch = 0
        while True:
            size = 1 + (task + batch) % 6
            messages = [payload(task, batch, i) for i in range(size)]
            result = await store.append(path, messages)
            sys.stdout.write(f"{task} {batch} {size} {result.next_offset}\\n")
            sys.stdout.flush()
            batch += 1

    async def main(url, tasks):
        async with streams.open_store(url) as store:
            await store.create(path)
            sys.stdout.write("ready\\n")
            sys.stdout.flush()
            await asyncio.gather(*(writer(store, first_task + t) for t in range(tasks)))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def payload(task: int, batch: int, index: int) -> bytes:
    body = f"{task}:{batch}:{index}:".encode()
    return body + bytes([(task * 31 + batch * 7 + index) % 256]) * ((task + batch) % 7 * 700)


def run_writers_and_kill(
    script: Path, url: str, writers: list[tuple[str, range]], acks_before_kill: int
) -> list[list[str]]:
    """Start one writer process per ``(path, task ids)``, SIGKILL them all once each has
    acknowledged ``acks_before_kill`` appends; return each one's complete ack lines."""
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(len(tasks)), path, str(tasks.start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # unbuffered: ``communicate`` reads the pipe's fd directly, so bytes a buffered
            # ``readline`` had read ahead would be lost (a torn ack line: a flaky failure)
            bufsize=0,
        )
        for path, tasks in writers
    ]
    outputs: list[list[str]] = [[] for _ in processes]
    deadline = time.monotonic() + 60
    try:
        for process, lines in zip(processes, outputs, strict=True):
            assert process.stdout is not None
            while len(lines) < acks_before_kill + 1:
                raw = process.stdout.readline()
                if not raw:
                    break
                lines.append(raw.decode())
                assert time.monotonic() < deadline, "writer too slow"
        for process in processes:
            if process.poll() is not None:
                _, stderr = process.communicate()
                raise AssertionError(f"writer exited early: {stderr.decode()}")
        for process in processes:
            process.send_signal(signal.SIGKILL)
        for process, lines in zip(processes, outputs, strict=True):
            rest, _ = process.communicate(timeout=30)
            assert process.returncode == -signal.SIGKILL
            # Lines printed after our last read are acknowledged too; a torn last line is not.
            lines.extend(rest.decode().splitlines(keepends=True))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    acked = []
    for lines in outputs:
        complete = [line for line in lines if line.endswith("\n")]
        assert complete[0] == "ready\n"
        acked.append([line.strip() for line in complete[1:]])
    return acked


def run_writer_and_kill(
    script: Path, url: str, path: str, tasks: int, acks_before_kill: int
) -> list[str]:
    """One writer process with ``tasks`` tasks; see :func:`run_writers_and_kill`."""
    return run_writers_and_kill(script, url, [(path, range(tasks))], acks_before_kill)[0]


async def check_stream(
    store: streams.Store, path: str, acked: list[str], tasks: int | range
) -> int:
    """Every acked batch of ``path`` is there byte-exact; the stream holds only whole batches."""
    messages: list[streams.Message] = []
    offset = "-1"
    while True:
        result = await store.read(path, offset, limit=5000)
        messages.extend(result.messages)
        offset = result.next_offset
        if result.up_to_date:
            break
    assert (await store.head(path)).next_offset == format_offset(len(messages))
    by_offset = {m.offset: i for i, m in enumerate(messages)}
    for line in acked:
        fields = line.split()
        assert len(fields) == 4, f"ack line {line!r} is not 'task batch size offset'"
        task_s, batch_s, size_s, next_offset = fields
        end = by_offset[next_offset]
        got = [m.data for m in messages[end - int(size_s) + 1 : end + 1]]
        assert got == [payload(int(task_s), int(batch_s), i) for i in range(int(size_s))], line
    # Only whole batches, each task's batches in order and without holes.
    index = 0
    next_batch = dict.fromkeys(range(tasks) if isinstance(tasks, int) else tasks, 0)
    while index < len(messages):
        task, batch, first = (int(x) for x in messages[index].data.split(b":", 3)[:3])
        assert first == 0
        assert batch == next_batch[task]
        next_batch[task] += 1
        size = 1 + (task + batch) % 6
        whole = [m.data for m in messages[index : index + size]]
        assert whole == [payload(task, batch, i) for i in range(size)]
        index += size
    return len(messages)


async def check_store(url: str, acked_by_path: dict[str, list[str]], tasks: int | range) -> int:
    """Reopen the file, check every stream, and prove the store still takes writes."""
    async with streams.open_store(url) as store:
        total = 0
        for path, acked in acked_by_path.items():
            total += await check_stream(store, path, acked, tasks)
        await store.create("after-recovery")
        result = await store.append("after-recovery", [b"after"])
        assert result.next_offset == format_offset(1)
        await store.delete("after-recovery")
        return total


def test_sigkill_loses_no_acknowledged_append(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    url = f"sqlite:///{tmp_path.resolve() / 'crash.db'}"
    tasks = 32
    acked = run_writer_and_kill(script, url, "crash", tasks, acks_before_kill=3000)
    assert len(acked) >= 3000
    stored = asyncio.run(check_store(url, {"crash": acked}, tasks))
    assert stored >= sum(int(line.split()[2]) for line in acked)


def test_repeated_kills_on_one_file(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    url = f"sqlite:///{tmp_path.resolve() / 'crash.db'}"
    tasks = 8
    acked_by_path: dict[str, list[str]] = {}
    for round_ in range(3):
        path = f"round-{round_}"
        acked_by_path[path] = run_writer_and_kill(script, url, path, tasks, acks_before_kill=300)
        # Earlier rounds' streams are re-checked after every later kill.
        asyncio.run(check_store(url, acked_by_path, tasks))


def test_two_writer_processes_on_one_stream(tmp_path: Path) -> None:
    """Two processes append to the same stream of one file (each one's cached tail goes stale
    whenever the other commits) and are killed together; nothing acknowledged is lost and no
    offset was handed out twice."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    url = f"sqlite:///{tmp_path.resolve() / 'crash.db'}"
    first, second = run_writers_and_kill(
        script, url, [("shared", range(0, 8)), ("shared", range(100, 108))], 400
    )
    acked = first + second
    assert len({line.split()[3] for line in acked}) == len(acked), "an offset was acked twice"
    asyncio.run(check_store(url, {"shared": acked}, range(0, 108)))
