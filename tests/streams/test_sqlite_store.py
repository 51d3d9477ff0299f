"""SQLite-only behaviour: durability across reopen, several store objects on one file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import streams
from streams import BackendUnavailable, Producer, StreamNotFound, format_offset
from streams._backends import _sqlite_io
from streams._backends import sqlite as sqlite_backend


def url_for(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path.resolve() / 'store.db'}"


async def read_all(store: streams.Store, path: str) -> list[bytes]:
    return [m.data for m in (await store.read(path, limit=100_000)).messages]


async def test_everything_survives_reopen(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    async with streams.open_store(url) as store:
        await store.create("s", content_type="application/json", ttl_seconds=3600)
        await store.append("s", [b"1", b"2"], producer=Producer("p", 2, 0), stream_seq="a")
        await store.create(
            "fork", content_type="application/json", fork_from="s", fork_offset=format_offset(1)
        )
        await store.append("fork", [b"f"])
        await store.create("closed", closed=True, messages=[b"x"])
        await store.create("gone", messages=[b"g"])
        await store.delete("gone")
        await store.kv_put("ns", "k", b"v")
    async with streams.open_store(url) as store:
        info = await store.head("s")
        assert info.content_type == "application/json" and info.ttl_seconds == 3600
        assert await read_all(store, "s") == [b"1", b"2"]
        assert await read_all(store, "fork") == [b"1", b"f"]
        assert (await store.head("fork")).forked_from == "s"
        assert (await store.head("closed")).closed
        with pytest.raises(StreamNotFound):
            await store.head("gone")
        assert await store.kv_get("ns", "k") == b"v"
        # Producer and Stream-Seq state are durable too.
        assert (await store.append("s", [b"2"], producer=Producer("p", 2, 0))).duplicate
        with pytest.raises(streams.SequenceConflict):
            await store.append("s", [b"3"], stream_seq="a")
        with pytest.raises(streams.ProducerFenced):
            await store.append("s", [b"3"], producer=Producer("p", 1, 0))


async def test_two_stores_on_one_file_see_each_other(tmp_path: Path) -> None:
    """Two store objects stand in for two processes: the writer cache must not go stale."""
    url = url_for(tmp_path)
    async with streams.open_store(url) as one, streams.open_store(url) as two:
        await one.create("s")
        await one.append("s", [b"1"])  # one caches the record at length 1
        await two.append("s", [b"2"])  # two moves the tail behind one's back
        result = await one.append("s", [b"3"])
        assert result.next_offset == format_offset(3)
        await two.append("s", [b"4"], producer=Producer("p", 0, 0))
        assert (await one.append("s", [b"4"], producer=Producer("p", 0, 0))).duplicate
        await two.delete("s")
        with pytest.raises(StreamNotFound):
            await one.append("s", [b"5"])
        created = await one.create("s")
        assert created.created and created.info.next_offset == format_offset(0)
        await two.create("other")  # ids handed out by both stay unique
        await one.create("third")
        await two.append("other", [b"o"])
        await one.append("third", [b"t"])
        assert await read_all(one, "other") == [b"o"]
        assert await read_all(two, "third") == [b"t"]
        assert await read_all(two, "s") == []


async def test_concurrent_writers_from_two_stores(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    async with streams.open_store(url) as one, streams.open_store(url) as two:
        await one.create("s")

        async def writer(store: streams.Store, name: str) -> None:
            for i in range(40):
                await store.append("s", [f"{name}{i}a".encode(), f"{name}{i}b".encode()])

        await asyncio.gather(*(writer(s, f"{n}-{k}-") for n, s in enumerate((one, two))
                               for k in range(4)))  # fmt: skip
        data = await read_all(one, "s")
        assert len(data) == 2 * 40 * 8
        for first, second in zip(data[::2], data[1::2], strict=True):
            assert first.endswith(b"a") and second == first[:-1] + b"b"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "nope://x"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(BackendUnavailable):
        streams.open_store(url)


def test_bad_synchronous_mode(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable):
        streams.open_store(url_for(tmp_path) + "?synchronous=bogus")


async def test_relative_url_and_synchronous_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with streams.open_store("sqlite:///sub/dir/rel.db?synchronous=FULL") as store:
        await store.create("s", messages=[b"x"])
    assert (tmp_path / "sub" / "dir" / "rel.db").exists()
    async with streams.open_store("sqlite:///sub/dir/rel.db") as store:
        assert await read_all(store, "s") == [b"x"]


async def test_commit_waits_for_another_connections_write_lock(tmp_path: Path) -> None:
    """A lock held elsewhere never blocks the event loop; the commit waits off-loop, then lands."""
    url = url_for(tmp_path)
    async with streams.open_store(url) as store:
        await store.create("s", messages=[b"1"])
        other = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO kv (namespace, key, value) VALUES ('ns', 'other', x'01')")
        append = asyncio.create_task(store.append("s", [b"2"]))
        ticks = 0
        for _ in range(20):  # the loop keeps running while the writer waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not append.done()
        assert ticks == 20
        other.execute("COMMIT")
        other.close()
        result = await asyncio.wait_for(append, 10)
        assert result.next_offset == format_offset(2)
        assert await store.kv_get("ns", "other") == b"\x01"
        assert await read_all(store, "s") == [b"1", b"2"]
        # The next commit notices the foreign write and still counts right.
        assert (await store.append("s", [b"3"])).next_offset == format_offset(3)


WAL_BOUND = 16 * 1024 * 1024  # issue 17: at most 16 MiB under sustained load


async def sustained_load(store: streams.Store, wal: Path, seconds: float) -> int:
    """Four writers appending 200 KB batches and two readers reading across the stream (on the
    reader threads: more than the inline limit) for ``seconds``; the largest WAL seen."""
    blob = b"x" * 4000
    largest = 0
    stop = asyncio.Event()
    for name in ("a", "b", "c", "d"):
        await store.create(name)

    async def write(name: str) -> None:
        nonlocal largest
        while not stop.is_set():
            await store.append(name, [blob] * 50)
            largest = max(largest, os.stat(wal).st_size)

    async def read() -> None:
        while not stop.is_set():
            for name in ("a", "b", "c", "d"):
                await store.read(name, limit=_sqlite_io.INLINE_READ_LIMIT + 500)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(write(n)) for n in "abcd"]
    tasks += [asyncio.create_task(read()) for _ in range(2)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return largest


async def test_wal_stays_bounded(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    blob = b"x" * 4000
    async with streams.open_store(url) as store:
        largest = await sustained_load(store, tmp_path / "store.db-wal", 4.0)
        assert largest <= WAL_BOUND, largest
        await store.create("s")
        await store.append("s", [blob] * 5000)  # in one go: may exceed the bound once
        await store.append("s", [blob])
        assert (tmp_path / "store.db-wal").stat().st_size <= WAL_BOUND
        result = await store.read("s", format_offset(4990), limit=100)
        assert [m.data for m in result.messages] == [blob] * 11


async def test_wal_stays_bounded_when_passive_checkpoints_lag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint beside the writer never finishes (a loaded machine, say): the writer
    truncates the WAL itself once it reaches the limit."""
    release = threading.Event()
    original = _sqlite_io.Checkpointer._run

    def stuck_run(self: _sqlite_io.Checkpointer) -> None:
        release.wait(30)
        original(self)

    monkeypatch.setattr(_sqlite_io.Checkpointer, "_run", stuck_run)
    try:
        async with streams.open_store(url_for(tmp_path)) as store:
            largest = await sustained_load(store, tmp_path / "store.db-wal", 3.0)
            assert isinstance(store, sqlite_backend.SqliteStore) and store._writer is not None
            assert store._writer.truncations >= 1
            release.set()
        assert largest <= WAL_BOUND, largest
    finally:
        release.set()


@pytest.mark.parametrize("mode", ["FULL", "OFF"])
async def test_synchronous_modes(tmp_path: Path, mode: str) -> None:
    url = url_for(tmp_path) + f"?synchronous={mode}"
    async with streams.open_store(url) as store:
        await store.create("s")
        results = await asyncio.gather(*(store.append("s", [f"{i}".encode()]) for i in range(50)))
        assert sorted(r.next_offset for r in results) == [format_offset(i + 1) for i in range(50)]
    async with streams.open_store(url) as store:
        assert sorted(int(d) for d in await read_all(store, "s")) == list(range(50))


async def test_commits_queued_behind_close_are_written(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    async with streams.open_store(url) as store:
        await store.create("s")
        tasks = [asyncio.create_task(store.append("s", [f"{i}".encode()])) for i in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sorted(r.next_offset for r in results) == [format_offset(i + 1) for i in range(5)]
    with pytest.raises(streams.StreamsError):
        await store.append("s", [b"after close"])
    async with streams.open_store(url) as store:
        assert sorted(await read_all(store, "s")) == [b"0", b"1", b"2", b"3", b"4"]


async def test_commits_do_not_wait_for_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints run on their own connection and thread: while one is stuck, appends go on
    committing, and the WAL is checkpointed once it is released."""
    started, release = threading.Event(), threading.Event()
    original = _sqlite_io.Checkpointer._run

    def stuck_run(self: _sqlite_io.Checkpointer) -> None:
        started.set()
        release.wait(30)
        original(self)

    monkeypatch.setattr(_sqlite_io.Checkpointer, "_run", stuck_run)
    monkeypatch.setattr(_sqlite_io, "CHECKPOINT_BYTES", 64 * 1024)
    blob = b"x" * 4000
    url = url_for(tmp_path)
    written = 0
    async with streams.open_store(url) as store:
        await store.create("s")
        while not started.is_set() and written < 1000:
            await store.append("s", [blob] * 10)
            written += 10
        assert started.is_set()
        for _ in range(20):  # all of these commit while the checkpoint is stuck
            await asyncio.wait_for(store.append("s", [blob] * 10), timeout=5)
            written += 10
        release.set()
        assert isinstance(store, sqlite_backend.SqliteStore)
        writer = store._writer
        assert writer is not None
        for _ in range(500):  # the released checkpoint finishes; a later commit catches up
            if writer.checkpointer.runs and writer.checkpointer.running is None:
                break
            await store.append("s", [b"y"])
            written += 1
            await asyncio.sleep(0.01)
        assert writer.checkpointer.runs >= 1 and writer.checkpointer.running is None
    async with streams.open_store(url) as store:
        assert (await store.head("s")).next_offset == format_offset(written)


async def test_waiters_see_another_processs_appends_promptly(tmp_path: Path) -> None:
    """Two stores on one file stand in for two processes (a server and a worker): a reader
    waiting in one is woken by an append in the other within the watch interval, not at its
    timeout; listeners hear about it too. A store alone on its file wakes nobody spuriously."""
    url = url_for(tmp_path)
    async with streams.open_store(url) as server, streams.open_store(url) as worker:
        await worker.create("s")
        heard: list[str] = []
        remove = server.listen("s", lambda: heard.append("s"))
        tail = (await server.head("s")).next_offset
        waiting = asyncio.create_task(server.wait("s", tail, 10.0))
        await asyncio.sleep(0.3)  # the watcher has seen the create by now
        assert not waiting.done()
        started = asyncio.get_running_loop().time()
        await worker.append("s", [b"x"])
        assert await asyncio.wait_for(waiting, 2.0) is True
        assert asyncio.get_running_loop().time() - started < 1.0
        assert heard
        remove()
        # a wake-up that is not for this path: the wait re-checks and keeps waiting
        await worker.create("other")
        assert await server.wait("s", (await server.head("s")).next_offset, 0.3) is False


async def test_a_store_alone_wakes_no_one_spuriously(tmp_path: Path) -> None:
    async with streams.open_store(url_for(tmp_path)) as store:
        await store.create("s")
        heard: list[str] = []
        remove = store.listen("other", lambda: heard.append("other"))
        for i in range(20):
            await store.append("s", [b"%d" % i])
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert heard == []  # its own commits are known precisely: no wake-everything
        remove()


_FOREIGN_APPEND = (
    "import asyncio, sys, streams\n"
    "async def main():\n"
    "    async with streams.open_store(sys.argv[1]) as store:\n"
    "        await store.append('s', [b'from another process'])\n"
    "asyncio.run(main())\n"
)


def _append_from_another_process(url: str) -> None:
    repo = str(Path(__file__).resolve().parents[2])
    subprocess.run(
        [sys.executable, "-c", _FOREIGN_APPEND, url],
        env={**os.environ, "PYTHONPATH": repo},
        check=True,
        timeout=60,
    )


async def test_paired_stores_do_not_wake_everything_for_each_others_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stores of one process on one file see each other's commits move ``data_version`` as
    another process's would: unpaired (two processes' stand-ins), the next commit of one after
    a commit of the other wakes everything at once; paired (``entities serve`` and its worker
    thread, which hand each other their commits' names) it does not. Another process's commit
    still wakes everything at once when no paired commit came between."""
    monkeypatch.setattr(sqlite_backend, "_WATCH_SECONDS", 60.0)  # only the commits' own checks
    url = url_for(tmp_path)
    async with streams.open_store(url) as store:
        await store.create("s")
    everything: list[bool] = []
    for paired in (False, True):
        everything.clear()
        async with streams.open_store(url) as a, streams.open_store(url) as b:
            if paired:
                for one in (a, b):
                    assert isinstance(one, sqlite_backend.SqliteStore)
                    one._pair()
            await a.append("s", [b"a"])
            remove = a.listen("*", lambda: everything.append(True), broadcast=False)
            await b.append("s", [b"b"])
            await a.append("s", [b"a"])
            assert everything == ([] if paired else [True])
            if paired:
                await asyncio.to_thread(_append_from_another_process, url)
                await a.append("s", [b"a"])
                assert everything == [True]  # nothing paired explains this move
            remove()


async def test_paired_stores_still_hear_another_process_within_the_watch(
    tmp_path: Path,
) -> None:
    """A move that a paired store's commit explains, but perhaps not wholly (another process
    committed too), wakes everything at the file watch's next look."""
    url = url_for(tmp_path)
    async with streams.open_store(url) as a, streams.open_store(url) as b:
        for store in (a, b):
            assert isinstance(store, sqlite_backend.SqliteStore)
            store._pair()
        await a.create("s")
        heard = asyncio.Event()
        remove = a.listen("*", heard.set, broadcast=False)
        await asyncio.to_thread(_append_from_another_process, url)
        await b.append("s", [b"b"])
        await a.append("s", [b"a"])
        await asyncio.wait_for(heard.wait(), 2.0)
        remove()
