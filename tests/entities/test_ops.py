"""Operations: ``/metrics`` (Prometheus text), ``/healthz``, ``/readyz`` against a real uvicorn,
the metrics of the wake path (wakes, durations, waits, dead letters, timers, lease steals,
commits, model tokens) and the per-wake log line."""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from entities import HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities._metrics import Family, refresh_pending
from entities.agent import tool
from entities.agent._anthropic import AnthropicModel
from entities.server import create_app, serve_metrics
from entities.server._prometheus import REGISTRY, family_metric, render
from tests._live import serving
from tests.entities._fake_providers import FakeProvider, FakeToolCall, FakeTurn
from tests.entities._fake_providers import fake_provider as fake_provider
from tests.entities._support import EntitiesProcess, free_port

registry = Registry()


@registry.define("ops-ok")
async def ops_ok(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        ctx.reply({"seen": message.payload})


@registry.define("ops-fail", max_attempts=1)
async def ops_fail(ctx: HandlerContext, wake: WakeEvent) -> None:
    if wake.messages:
        raise RuntimeError("always fails")


@registry.define("ops-sleep")
async def ops_sleep(ctx: HandlerContext, wake: WakeEvent) -> None:
    if any(m.payload == "nap" for m in wake.messages):
        await ctx.send(ctx.entity_url, "up", after_ms=5_000)


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with ``labels`` in Prometheus text ``text`` (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def now_value(name: str, **labels: str) -> float:
    return value(render().decode(), name, **labels)


async def test_metrics_over_http_count_wakes_failures_and_commits(tmp_path: Path) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path}/m.db") as rt:
        worker = rt.worker(poll_interval=0.1)
        async with serving(create_app(rt, worker=worker)) as base:
            async with httpx2.AsyncClient(base_url=base) as client:
                first = await client.get("/metrics")
                assert first.status_code == 200
                assert first.headers["content-type"].startswith("text/plain")
                before = first.text
                stop = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(worker.run, stop)
                    await rt.spawn("/ops-ok/a", initial_message="one")
                    receipt = await rt.send("/ops-ok/a", "two")
                    await rt.spawn("/ops-fail/b", initial_message="boom")
                    with anyio.fail_after(20):
                        while True:
                            after = (await client.get("/metrics")).text
                            done = value(
                                after, "entities_dead_letters_total", type="ops-fail"
                            ) - value(before, "entities_dead_letters_total", type="ops-fail")
                            outcome = await rt.outcome("/ops-ok/a", receipt.key)
                            if done >= 1 and outcome.status == "completed":
                                break
                            await anyio.sleep(0.05)
                    stop.set()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    completed = delta("entities_wakes_total", type="ops-ok", outcome="completed")
    assert completed >= 1  # the two messages may share a wake
    assert delta("entities_wake_duration_seconds_count", type="ops-ok") == completed
    assert delta("entities_wake_duration_seconds_sum", type="ops-ok") > 0
    assert delta("entities_send_to_start_seconds_count", type="ops-ok") >= 1
    assert delta("entities_wakes_total", type="ops-fail", outcome="dead_lettered") == 1
    assert delta("entities_dead_letters_total", type="ops-fail") == 1
    assert delta("entities_store_commit_seconds_count", op="commit") >= completed + 1
    assert delta("entities_store_commit_seconds_count", op="claim") >= completed + 1


async def test_pending_gauges_by_type_with_the_age_of_the_oldest_event(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with Runtime(registry, f"sqlite:///{tmp_path}/p.db", clock=clock) as rt:
        await rt.spawn("/ops-ok/p1")
        clock.advance(10)
        await rt.spawn("/ops-ok/p2")
        await rt.spawn("/ops-sleep/p3")
        clock.advance(20)
        async with serving(create_app(rt)) as base, httpx2.AsyncClient(base_url=base) as client:
            text = (await client.get("/metrics")).text
        assert value(text, "entities_pending_entities", type="ops-ok") == 2
        assert value(text, "entities_pending_entities", type="ops-sleep") == 1
        assert value(text, "entities_oldest_pending_age_seconds", type="ops-ok") == pytest.approx(
            30, abs=0.01
        )
        assert value(
            text, "entities_oldest_pending_age_seconds", type="ops-sleep"
        ) == pytest.approx(20, abs=0.01)
        await rt.run_until_idle()
        await rt.send("/ops-ok/p1", "again")  # pending again, from its newest event
        clock.advance(3)
        await refresh_pending(rt.store, clock.now())
        assert now_value("entities_pending_entities", type="ops-ok") == 1
        assert now_value("entities_pending_entities", type="ops-sleep") == 0
        assert now_value("entities_oldest_pending_age_seconds", type="ops-ok") == pytest.approx(
            3, abs=0.01
        )


async def test_health_is_open_and_ready_checks_store_schema_and_worker(tmp_path: Path) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path}/h.db") as rt:
        worker = rt.worker(poll_interval=0.1)
        app = create_app(rt, worker=worker, token="s3cret")
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            not_yet = await client.get("/readyz")  # no token needed; the worker has not run
            assert not_yet.status_code == 503
            assert not_yet.json()["checks"] == {
                "store": "ok",
                "migrations": "ok",
                "worker": "its loop has not run lately",
            }
            assert (await client.get("/metrics")).status_code == 401
            auth = {"Authorization": "Bearer s3cret"}
            assert (await client.get("/metrics", headers=auth)).status_code == 200
            assert (await client.get("/_entities/types")).status_code == 401
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run, stop)
                with anyio.fail_after(10):
                    while True:
                        ready = await client.get("/readyz")
                        if ready.status_code == 200:
                            break
                        await anyio.sleep(0.05)
                assert ready.json() == {
                    "status": "ready",
                    "checks": {"store": "ok", "migrations": "ok", "worker": "ok"},
                }
                stop.set()
            assert (await client.get("/readyz")).status_code == 503  # its loop has ended
            await rt.store.aclose()
            broken = await client.get("/readyz")
            assert broken.status_code == 503
            assert broken.json()["checks"]["store"] != "ok"


async def test_schema_versions_of_each_store(store_url: str) -> None:
    async with Runtime(registry, store_url) as rt:
        applied, expected = await rt.store.schema_versions()
    if store_url.startswith("memory"):
        assert (applied, expected) == (0, 0)
    else:
        assert applied == expected >= 1


async def test_one_info_line_per_wake(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="entities.wake")
    async with Runtime(registry, f"sqlite:///{tmp_path}/l.db") as rt:
        await rt.spawn("/ops-ok/log", initial_message="hi")
        await rt.spawn("/ops-fail/log", initial_message="hi")
        await rt.run_until_idle()
    lines = {r.url: r for r in caplog.records if r.name == "entities.wake"}  # type: ignore[attr-defined]
    assert set(lines) == {"/ops-ok/log", "/ops-fail/log"}
    ok, failed = lines["/ops-ok/log"], lines["/ops-fail/log"]
    assert (ok.type, ok.attempt, ok.outcome) == ("ops-ok", 1, "completed")  # type: ignore[attr-defined]
    assert failed.outcome == "dead_lettered"  # type: ignore[attr-defined]
    assert ok.duration_ms >= 0  # type: ignore[attr-defined]
    assert ok.getMessage().startswith("wake /ops-ok/log ops-ok attempt 1: completed in ")


async def test_timer_lateness_and_expired_lease_steals(tmp_path: Path) -> None:
    clock = VirtualClock()
    db = f"sqlite:///{tmp_path}/t.db"
    fired = now_value("entities_timer_lateness_seconds_count")
    late = now_value("entities_timer_lateness_seconds_sum")
    async with Runtime(registry, db, clock=clock) as rt:
        await rt.spawn("/ops-sleep/s", initial_message="nap")
        await rt.run_until_idle()
        clock.advance(7)  # two seconds past the sleep's due time
        await rt.run_until_idle()
    assert now_value("entities_timer_lateness_seconds_count") == fired + 1
    assert now_value("entities_timer_lateness_seconds_sum") - late == pytest.approx(2, abs=0.01)

    steals = now_value("entities_lease_steals_total", reason="expired")
    async with (
        Runtime(registry, db, clock=clock, worker_id="crashed", lease_seconds=5) as one,
        Runtime(registry, db, clock=clock, worker_id="heir", lease_seconds=5) as two,
    ):
        await one.spawn("/ops-ok/s2")
        taken = await one.worker().claim("/ops-ok/s2")
        assert taken is not None  # and never run: its worker "crashed"
        assert await two.worker().claim("/ops-ok/s2") is None  # the lease still holds
        clock.advance(6)
        assert await two.worker().claim("/ops-ok/s2") is not None
    assert now_value("entities_lease_steals_total", reason="expired") == steals + 1


async def test_model_tokens_and_calls_by_type_and_provider(
    fake_provider: FakeProvider, tmp_path: Path
) -> None:
    agents = Registry()

    @tool
    async def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @agents.define("ops-agent")
    async def agent(ctx: HandlerContext, wake: WakeEvent) -> None:
        if wake.messages:
            model = AnthropicModel(
                "claude-test", api_key="k", base_url=fake_provider.anthropic_base_url
            )
            ctx.use_agent("sys", model, tools=[add])
            await ctx.agent.run()

    fake_provider.script(
        FakeTurn(tool_calls=[FakeToolCall("add", {"a": 1, "b": 2})], input_tokens=11),
        FakeTurn(text="3", input_tokens=13, output_tokens=2),
    )
    labels: dict[str, Any] = {"type": "ops-agent", "provider": "anthropic"}
    tokens_in = now_value("entities_model_tokens_total", direction="input", **labels)
    tokens_out = now_value("entities_model_tokens_total", direction="output", **labels)
    calls = now_value("entities_model_calls_total", outcome="ok", **labels)
    async with Runtime(agents, f"sqlite:///{tmp_path}/a.db") as rt:
        await rt.spawn("/ops-agent/x", initial_message="1+2?")
        await rt.run_until_idle()
    assert now_value("entities_model_tokens_total", direction="input", **labels) == tokens_in + 24
    assert now_value("entities_model_tokens_total", direction="output", **labels) == tokens_out + 7
    assert now_value("entities_model_calls_total", outcome="ok", **labels) == calls + 2


def test_metric_names_are_the_documented_ones() -> None:
    names = {metric.name for metric in REGISTRY.collect()}
    assert {
        "entities_wakes",
        "entities_wake_duration_seconds",
        "entities_send_to_start_seconds",
        "entities_pending_entities",
        "entities_oldest_pending_age_seconds",
        "entities_dead_letters",
        "entities_timer_lateness_seconds",
        "entities_lease_steals",
        "entities_store_commit_seconds",
        "entities_model_tokens",
        "entities_model_calls",
    } <= names


async def test_serve_metrics_alone_for_a_worker_without_http(tmp_path: Path) -> None:
    async with Runtime(registry, f"sqlite:///{tmp_path}/w.db") as rt:
        worker = rt.worker(poll_interval=0.1)
        urls: list[str] = []
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            tg.start_soon(partial(serve_metrics, rt, worker, port=0, ready=urls.append))
            await rt.spawn("/ops-ok/w", initial_message="hi")
            with anyio.fail_after(10):
                while True:
                    if urls:
                        break
                    await anyio.sleep(0.01)
                async with httpx2.AsyncClient(base_url=urls[0]) as client:
                    while True:
                        if (await client.get("/readyz")).status_code == 200:
                            break
                        await anyio.sleep(0.05)
                    text = (await client.get("/metrics")).text
                    assert "entities_wakes_total" in text
                    assert (await client.get("/_entities/types")).status_code == 404
            tg.cancel_scope.cancel()
        with pytest.raises(httpx2.ConnectError):  # it stopped listening
            async with httpx2.AsyncClient(base_url=urls[0]) as client:
                await client.get("/healthz")
        with pytest.raises(OSError, match="cannot serve metrics"):
            async with serving(create_app(rt)) as base:
                port = int(base.rsplit(":", 1)[1])
                await serve_metrics(rt, None, port=port)


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    family = Family("t_seconds", "test", ("type",), (0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        family.child(("a",)).observe(seconds)
    samples = {(s.name, s.labels.get("le")): s.value for s in family_metric(family).samples}
    assert samples[("t_seconds_bucket", "0.1")] == 2  # 0.1 itself is in le="0.1"
    assert samples[("t_seconds_bucket", "1.0")] == 4
    assert samples[("t_seconds_bucket", "+Inf")] == 5
    assert samples[("t_seconds_count", None)] == 5
    assert samples[("t_seconds_sum", None)] == pytest.approx(8.65)


def test_worker_metrics_port_serves_the_operations_endpoints(tmp_path: Path) -> None:
    port = free_port()
    db = f"sqlite:///{tmp_path}/cli.db"
    worker = EntitiesProcess(
        ["worker", "examples.all:registry", "--db", db, "--metrics-port", str(port)],
        log=tmp_path / "worker.log",
        port=port,
    )
    worker.start()
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 15
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").text
                time.sleep(0.05)
            assert client.get("/healthz").json() == {"status": "ok"}
            assert "entities_pending_entities" in client.get("/metrics").text
    finally:
        worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0
    assert f"metrics on http://127.0.0.1:{port}/metrics" in worker.output()
