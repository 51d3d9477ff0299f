"""Property tests: random operation sequences against every backend, checked against a model.

Each example drives a fresh store inside its own event loop (``asyncio.run`` in a sync test), so
hypothesis and pytest-asyncio never share a loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streams
from streams import (
    Producer,
    ProducerEpochInvalid,
    ProducerFenced,
    ProducerSequenceGap,
    ProducerState,
    Store,
    StreamClosed,
    format_offset,
    parse_offset,
)
from streams._backends._engine import StreamRecord
from tests._stores import BACKENDS, drop_store, make_store_url

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

payloads = st.binary(max_size=24)
batches = st.lists(payloads, min_size=1, max_size=5)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 3), batches, st.booleans()),
        st.tuples(st.just("read"), st.integers(0, 3), st.integers(0, 1000), st.integers(1, 7)),
        st.tuples(st.just("close"), st.integers(0, 3)),
        st.tuples(st.just("fork"), st.integers(0, 3), st.integers(0, 1000)),
        st.tuples(st.just("delete"), st.integers(0, 3)),
    ),
    min_size=1,
    max_size=25,
)


@dataclass
class Model:
    """What a stream must hold: its messages and every offset the store handed out for it."""

    messages: list[bytes] = field(default_factory=list)
    closed: bool = False
    offsets: list[str] = field(default_factory=lambda: ["-1"])
    parent: str | None = None
    deleted: bool = False


def purged(models: dict[str, Model], path: str) -> bool:
    """A deleted stream is purged once every fork taken from it is purged."""
    children = [name for name, m in models.items() if m.parent == path]
    return models[path].deleted and all(purged(models, c) for c in children)


def run_with_store(backend: str, body: Any) -> None:
    """Run ``body(store)`` in a fresh event loop against a fresh, empty store."""

    async def main(directory: Path) -> None:
        url = make_store_url(backend, directory)
        try:
            async with streams.open_store(url) as store:
                await body(store)
        finally:
            await drop_store(url)

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(main(Path(directory)))


async def read_suffix(store: Store, path: str, offset: str, limit: int) -> list[streams.Message]:
    out: list[streams.Message] = []
    while True:
        result = await store.read(path, offset, limit=limit)
        out.extend(result.messages)
        if result.up_to_date:
            return out
        assert result.messages
        offset = result.next_offset


def position(offset: str) -> int:
    parsed = parse_offset(offset)
    assert parsed is not None
    return parsed


async def check_stream(store: Store, path: str, model: Model) -> None:
    """Byte-exact suffixes from every offset ever returned; strictly increasing offsets."""
    everything = await read_suffix(store, path, "-1", 1000)
    assert [m.data for m in everything] == model.messages
    offsets = [m.offset for m in everything]
    assert all(a < b for a, b in itertools.pairwise(offsets))
    assert offsets == [format_offset(i + 1) for i in range(len(offsets))]
    info = await store.head(path)
    assert info.next_offset == format_offset(len(model.messages))
    assert info.closed == model.closed
    for offset in {*model.offsets, *offsets}:
        start = 0 if offset == "-1" else position(offset)
        suffix = await read_suffix(store, path, offset, 3)
        assert [m.data for m in suffix] == model.messages[start:]


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY_SETTINGS
@given(ops=operations)
def test_random_operations_match_the_model(backend: str, ops: list[tuple[Any, ...]]) -> None:
    async def body(store: Store) -> None:
        models: dict[str, Model] = {"s0": Model()}
        await store.create("s0")
        for op in ops:
            paths = sorted(name for name, m in models.items() if not m.deleted)
            if not paths:
                break
            path = paths[op[1] % len(paths)]
            model = models[path]
            if op[0] == "append":
                _, _, batch, close = op
                if model.closed:
                    with pytest.raises(StreamClosed) as err:
                        await store.append(path, batch, close=close)
                    assert err.value.next_offset == format_offset(len(model.messages))
                    continue
                result = await store.append(path, batch, close=close)
                model.messages.extend(batch)
                model.closed = close
                assert result.next_offset == format_offset(len(model.messages))
                assert result.closed == close
                model.offsets.append(result.next_offset)
            elif op[0] == "read":
                _, _, pick, limit = op
                offset = model.offsets[pick % len(model.offsets)]
                read = await store.read(path, offset, limit=limit)
                start = 0 if offset == "-1" else position(offset)
                expected = model.messages[start : start + limit]
                assert [m.data for m in read.messages] == expected
                assert read.next_offset == format_offset(start + len(expected))
                assert read.up_to_date == (start + len(expected) == len(model.messages))
                assert read.closed == (read.up_to_date and model.closed)
                model.offsets.extend(m.offset for m in read.messages)
            elif op[0] == "close":
                result = await store.close_stream(path)
                assert result.closed
                assert result.next_offset == format_offset(len(model.messages))
                model.closed = True
            elif op[0] == "fork":
                _, _, pick = op
                offset = model.offsets[pick % len(model.offsets)]
                start = 0 if offset == "-1" else position(offset)
                name = f"f{len(models)}"
                fork_offset = format_offset(start)
                created = await store.create(name, fork_from=path, fork_offset=fork_offset)
                assert created.info.next_offset == fork_offset
                models[name] = Model(
                    list(model.messages[:start]), offsets=["-1", fork_offset], parent=path
                )
            elif op[0] == "delete":
                await store.delete(path)
                model.deleted = True
        for path, model in models.items():
            if not model.deleted:
                await check_stream(store, path, model)
            elif purged(models, path):
                with pytest.raises(streams.StreamNotFound):
                    await store.head(path)
            else:
                with pytest.raises(streams.StreamGone):
                    await store.read(path)

    run_with_store(backend, body)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(
        st.lists(st.integers(1, 8), min_size=1, max_size=5),  # one task: its batch sizes
        min_size=2,
        max_size=24,
    )
)
def test_concurrent_writers_never_interleave_a_batch(backend: str, plan: list[list[int]]) -> None:
    async def body(store: Store) -> None:
        await store.create("s")
        acked: dict[tuple[int, int], str] = {}

        async def writer(task: int, sizes: list[int]) -> None:
            for number, size in enumerate(sizes):
                batch = [f"{task}:{number}:{i}".encode() for i in range(size)]
                result = await store.append("s", batch)
                acked[(task, number)] = result.next_offset
                await asyncio.sleep(0)

        await asyncio.gather(*(writer(t, sizes) for t, sizes in enumerate(plan)))
        messages = await read_suffix(store, "s", "-1", 1000)
        assert len(messages) == sum(sum(sizes) for sizes in plan)
        index = 0
        last_batch: dict[int, int] = {}
        while index < len(messages):
            task, number, first = map(int, messages[index].data.split(b":"))
            assert first == 0, "a batch must start with its first message"
            size = plan[task][number]
            run = messages[index : index + size]
            assert [m.data for m in run] == [f"{task}:{number}:{i}".encode() for i in range(size)]
            assert acked[(task, number)] == run[-1].offset
            assert last_batch.get(task, -1) == number - 1, "a writer's batches keep their order"
            last_batch[task] = number
            index += size
        assert len(acked) == sum(len(sizes) for sizes in plan)

    run_with_store(backend, body)


producer_rounds = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["next", "dup", "gap", "stale", "bump", "bad_bump"]),
            st.integers(1, 4),  # batch size
        ),
        min_size=3,
        max_size=3,
    ),  # one op per producer; the three run concurrently (one group commit in SQLite)
    min_size=1,
    max_size=12,
)


@dataclass
class ProducerModel:
    epoch: int = 0
    seq: int | None = None  # last accepted seq in ``epoch``
    offset: str = ""  # next_offset returned for that append
    batches: list[list[bytes]] = field(default_factory=list)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=producer_rounds)
def test_idempotent_producers_match_the_model(
    backend: str, rounds: list[list[tuple[str, int]]]
) -> None:
    async def body(store: Store) -> None:
        await store.create("s")
        models = [ProducerModel() for _ in range(3)]
        counter = 0

        async def one(pid: int, kind: str, size: int) -> None:
            nonlocal counter
            model = models[pid]
            counter += 1
            batch = [f"{pid}:{counter}:{i}".encode() for i in range(size)]
            name = f"p{pid}"
            if kind == "dup" and model.seq is not None:
                result = await store.append(
                    "s", batch, producer=Producer(name, model.epoch, model.seq)
                )
                assert result.duplicate and result.next_offset == model.offset
                assert result.producer == ProducerState(model.epoch, model.seq)
            elif kind == "gap":
                seq = 1 if model.seq is None else model.seq + 2
                with pytest.raises(ProducerSequenceGap) as gap:
                    await store.append("s", batch, producer=Producer(name, model.epoch, seq))
                assert (gap.value.expected, gap.value.received) == (
                    seq - 1 if model.seq is not None else 0,
                    seq,
                )
            elif kind == "stale" and model.epoch > 0:
                with pytest.raises(ProducerFenced) as fenced:
                    await store.append("s", batch, producer=Producer(name, model.epoch - 1, 0))
                assert fenced.value.current_epoch == model.epoch
            elif kind == "bad_bump" and model.seq is not None:
                with pytest.raises(ProducerEpochInvalid):
                    await store.append("s", batch, producer=Producer(name, model.epoch + 1, 1))
            else:
                if kind == "bump" and model.seq is not None:
                    model.epoch, model.seq = model.epoch + 1, None
                seq = 0 if model.seq is None else model.seq + 1
                result = await store.append("s", batch, producer=Producer(name, model.epoch, seq))
                assert not result.duplicate
                assert result.producer == ProducerState(model.epoch, seq)
                model.seq, model.offset = seq, result.next_offset
                model.batches.append(batch)

        for round_ in rounds:
            await asyncio.gather(*(one(pid, kind, size) for pid, (kind, size) in enumerate(round_)))
        messages = await read_suffix(store, "s", "-1", 1000)
        assert len(messages) == sum(len(b) for m in models for b in m.batches)
        index = 0
        seen: dict[int, int] = {}
        while index < len(messages):
            pid = int(messages[index].data.split(b":")[0])
            number = seen.get(pid, 0)
            batch = models[pid].batches[number]
            assert [m.data for m in messages[index : index + len(batch)]] == batch
            seen[pid] = number + 1
            index += len(batch)
        for model in models:  # each producer's last offset ends its last batch
            if model.batches:
                assert messages[position(model.offset) - 1].data == model.batches[-1][-1]

    run_with_store(backend, body)


def test_stream_record_copy_carries_every_field() -> None:
    # a field added to StreamRecord but not to copy() would silently reset on every commit
    values: dict[str, object] = {}
    for number, spec in enumerate(dataclasses.fields(StreamRecord)):
        if spec.type in ("int", "int | None"):
            values[spec.name] = 100 + number
        elif spec.type in ("float", "float | None"):
            values[spec.name] = 0.5 + number
        elif spec.type == "bool":
            values[spec.name] = True
        elif spec.type == "tuple[str, int, int] | None":
            values[spec.name] = ("producer", 1, 2)
        else:
            values[spec.name] = f"value-{number}"
    record = StreamRecord(**values)  # type: ignore[arg-type]
    copied = record.copy()
    assert copied == record and copied is not record
    assert {f.name: getattr(copied, f.name) for f in dataclasses.fields(StreamRecord)} == values
