"""Schedules from outside a wake: the Runtime API and the HTTP routes (real uvicorn), on every
store backend."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx2
import pytest

from entities import ContextError, HandlerContext, Registry, Runtime, VirtualClock, WakeEvent
from entities.server import create_app
from tests._live import serving


def build(ticks: list[dict[str, Any]]) -> Registry:
    registry = Registry()

    @registry.define("t")
    async def handler(ctx: HandlerContext, wake: WakeEvent) -> None:
        ticks.extend(w for w in wake.wakes if w.get("kind") == "cron")

    return registry


async def test_runtime_schedule_cron_and_cancel(store_url: str) -> None:
    ticks: list[dict[str, Any]] = []
    clock = VirtualClock(start=1_700_000_000.0)
    async with Runtime(build(ticks), store_url, clock=clock) as rt:
        await rt.spawn("/t/a")
        await rt.run_until_idle()
        entry = await rt.schedule_cron("/t/a", "minutely", "* * * * *", payload={"p": 1})
        assert entry["id"] == "cron:minutely" and entry["status"] == "active"
        with pytest.raises(ContextError):
            await rt.schedule_cron("/t/a", "bad", "not cron")
        await rt.advance(61)
        assert len(ticks) == 1 and ticks[0]["payload"] == {"p": 1}
        replaced = await rt.schedule_cron("/t/a", "minutely", "*/5 * * * *")
        assert replaced["expression"] == "*/5 * * * *"
        assert [s["id"] for s in await rt.schedules("/t/a")] == ["cron:minutely"]
        assert await rt.cancel_schedule("/t/a", "minutely")
        assert not await rt.cancel_schedule("/t/a", "minutely")
        await rt.advance(3600)
        assert len(ticks) == 1  # the replaced and the cancelled timers never fired


async def test_schedule_routes_over_http(store_url: str) -> None:
    ticks: list[dict[str, Any]] = []
    async with Runtime(build(ticks), store_url) as rt, serving(create_app(rt)) as url:
        base = f"{url}/_entities/entities/t/a"
        async with httpx2.AsyncClient(timeout=10) as http:
            assert (await http.put(base, json={})).status_code == 201
            put = await http.put(
                f"{base}/schedules/daily",
                json={"expression": "0 9 * * *", "timezone": "Europe/Paris"},
            )
            assert put.status_code == 200 and put.json()["timezone"] == "Europe/Paris"
            bad = await http.put(f"{base}/schedules/x", json={"expression": "nope"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "CONTEXT_ERROR"
            shape = await http.put(f"{base}/schedules/x", json={"cron": "* * * * *"})
            assert shape.status_code == 422
            listed = await http.get(f"{base}/schedules")
            assert [s["id"] for s in listed.json()] == ["cron:daily"]
            # when it fires next (the console counts down to it): 09:00 in Paris, within a day
            next_fire = listed.json()[0]["next_fire_at"]
            assert time.time() < next_fire <= time.time() + 86_400
            paris = datetime.fromtimestamp(next_fire, ZoneInfo("Europe/Paris"))
            assert (paris.hour, paris.minute, paris.second) == (9, 0, 0)
            assert (await http.delete(f"{base}/schedules/daily")).status_code == 200
            assert (await http.delete(f"{base}/schedules/daily")).status_code == 404
            missing = await http.get(f"{url}/_entities/entities/t/none/schedules")
            assert missing.status_code == 404
