"""The console (``/ui/``) over a real uvicorn and a worker, in a real browser.

Playwright drives Debian's Chromium (:data:`CHROMIUM`; ``make test`` installs it when missing;
Playwright's own browser downloads are never used). Where it is missing these tests skip, unless
``ENTITIES_REQUIRE_BROWSER=1`` (CI), under which they fail. The routes' test needs no browser.
One store backend (SQLite) is enough: the console is a client of the HTTP API, which
``test_http.py`` runs on every backend.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import pytest
from playwright.async_api import Page, async_playwright, expect

from entities import HandlerContext, Registry, Runtime, WakeEvent
from entities.agent._anthropic import AnthropicModel
from entities.server import create_app
from examples import all as examples_all
from tests._live import serving
from tests._stores import make_store_url
from tests.entities._fake_providers import FakeTurn, in_order, running_fake

CHROMIUM = "/usr/bin/chromium"
REQUIRE_ENV = "ENTITIES_REQUIRE_BROWSER"
TOKEN = "console-s3cret"
WRONG_TOKEN_TEXT = "401: this server needs a valid bearer token (entities serve --token)"

expect.set_options(timeout=15_000)


@dataclass
class Console:
    base: str
    runtime: Runtime
    http: httpx2.AsyncClient

    async def spawn(self, url: str, **body: object) -> None:
        response = await self.http.put(f"/_entities/entities{url}", json=body)
        assert response.status_code == 201, response.text


def examples_registry(*extra: Callable[[Registry], None]) -> Registry:
    registry = Registry()
    for entity_type in examples_all.registry.list():
        registry.add(entity_type)
    for add in extra:
        add(registry)
    return registry


@asynccontextmanager
async def console(
    registry: Registry, tmp_path: Path, *, token: str | None = None
) -> AsyncIterator[Console]:
    """A real uvicorn serving ``create_app`` (the console included) plus a worker, on SQLite."""
    async with Runtime(registry, make_store_url("sqlite", tmp_path)) as runtime:
        async with serving(create_app(runtime, token=token)) as base:
            stop = anyio.Event()
            worker = asyncio.create_task(runtime.worker(poll_interval=0.1).run(stop))
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                async with httpx2.AsyncClient(base_url=base, headers=headers, timeout=10) as http:
                    yield Console(base, runtime, http)
            finally:
                stop.set()
                await worker


def _browser_missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; `make test` does)"
    return None


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    """A fresh page (and tab session) in headless Chromium; fails the test on a page error."""
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get(REQUIRE_ENV, "0") == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {missing}", pytrace=False)
        pytest.skip(missing)
    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            tab = await browser.new_page()
            tab.on("pageerror", lambda error: errors.append(str(error)))
            yield tab
        finally:
            await browser.close()
    assert not errors, errors


# -- routes (no browser) ----------------------------------------------------------------------


async def test_console_routes_and_token_exemption(tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path, token=TOKEN) as c:
        await c.spawn("/counter/c1")
        async with httpx2.AsyncClient(base_url=c.base, timeout=10) as anonymous:
            root = await anonymous.get("/")
            assert root.status_code == 307 and root.headers["location"] == "/ui/"
            bare = await anonymous.get("/ui")
            assert bare.status_code == 307 and bare.headers["location"] == "/ui/"
            index = (await anonymous.get("/ui/")).text
            assert '<script type="module" src="/ui/assets/app.js">' in index
            for deep in ("/ui/counter/c1", "/ui/workers", "/ui/nothing/here"):
                page = await anonymous.get(deep)  # client-side routes: the same page
                assert page.status_code == 200 and page.text == index
                assert page.headers["content-type"].startswith("text/html")
            for asset in ("app.js", "api.js", "entity.js", "model.js", "app.css"):
                served = await anonymous.get(f"/ui/assets/{asset}")
                assert served.status_code == 200, asset
                assert served.headers["cache-control"] == "no-cache"
            script = await anonymous.get("/ui/assets/app.js")
            assert script.headers["content-type"].split(";")[0] in {
                "text/javascript",
                "application/javascript",
            }
            assert (await anonymous.get("/ui/assets/nope.js")).status_code == 404
            for escape in ("/ui/assets/../_console.py", "/ui/assets/%2e%2e/_console.py"):
                assert (await anonymous.get(escape)).text in (index, "Not Found")
            # the data stays behind the token
            for path in ("/_entities/entities", "/v1/stream/counter/c1/main?offset=-1"):
                assert (await anonymous.get(path)).status_code == 401, path
            assert (await anonymous.post("/ui/", json={})).status_code == 401
        assert (await c.http.get("/_entities/entities")).status_code == 200


# -- in the browser ---------------------------------------------------------------------------


async def test_list_shows_spawned_entities_and_filters(page: Page, tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path) as c:
        await c.spawn("/counter/c1", tags={"team": "blue"})
        await c.spawn("/chat/ch1", initial_message="hi")
        await page.goto(c.base + "/")
        await expect(page).to_have_url(c.base + "/ui/")
        rows = page.locator(".entity-table tbody tr")
        await expect(rows).to_have_count(2)
        await expect(page.locator(".entity-table")).to_contain_text("/counter/c1")
        await expect(page.locator(".entity-table")).to_contain_text("team=blue")
        await expect(page.locator(".entity-table")).to_contain_text("/chat/ch1")
        # a spawn made after the page opened shows up by itself
        await c.spawn("/counter/c2")
        await expect(rows).to_have_count(3)
        await page.select_option("select[name=type]", "counter")
        await expect(rows).to_have_count(2)
        await expect(page).to_have_url(c.base + "/ui/?type=counter")
        await page.fill("input[name=q]", "blue")
        await expect(rows).to_have_count(1)
        await page.click("a.entity:text-is('/counter/c1')")
        await expect(page).to_have_url(c.base + "/ui/counter/c1")
        await expect(page.locator(".entity-head h1")).to_contain_text("/counter/c1")
        await expect(page.locator(".tags")).to_contain_text("team=blue")
        await page.click("nav >> text=Workers")
        await expect(page.locator("main table")).to_contain_text("live")


def _talker(model: AnthropicModel) -> Callable[[Registry], None]:
    def add(registry: Registry) -> None:
        @registry.define("talker", description="Answers through the (fake) Anthropic API")
        async def talker(ctx: HandlerContext, wake: WakeEvent) -> None:
            if wake.messages:
                ctx.use_agent("Be brief.", model=model)
                await ctx.agent.run()

    return add


async def test_streamed_answer_shows_while_the_run_goes(page: Page, tmp_path: Path) -> None:
    resume = threading.Event()
    # Anthropic events: message_start, ping, content_block_start, then one per delta: the
    # stream holds after the first two deltas until the test has seen them on the page
    turn = FakeTurn(text=["The answer ", "is ", "forty-", "two."], pause_after=5, resume=resume)
    with running_fake(in_order(turn)) as fake:
        model = AnthropicModel(
            "claude-fake-1", api_key="sk-test", base_url=fake.anthropic_base_url, max_retries=0
        )
        async with console(examples_registry(_talker(model)), tmp_path) as c:
            try:
                await c.spawn("/talker/t1", initial_message="what is the answer?")
                await page.goto(c.base + "/ui/talker/t1")
                conversation = page.locator(".conversation")
                await expect(conversation.locator(".msg.user")).to_contain_text(
                    "what is the answer?"
                )
                streaming = conversation.locator(".msg.assistant.streaming")
                await expect(streaming).to_contain_text("The answer is")
                await expect(page.locator(".entity-head .badge")).to_have_text("running")
                # the run is still going: no end of the answer, no outcome yet
                assert "forty-two" not in await conversation.inner_text()
                await expect(page.locator(".timeline .wake-row .badge").first).to_have_text(
                    "running"
                )
                runs = (await c.http.get("/_entities/entities/talker/t1")).json()["runs"]
                assert runs == 0
            finally:
                resume.set()
            await expect(conversation.locator(".msg.assistant")).to_have_text(
                "assistantThe answer is forty-two."
            )
            await expect(streaming).to_have_count(0)
            await expect(page.locator(".timeline .wake-row .badge").first).to_have_text("completed")
            await expect(page.locator(".entity-head .badge")).to_have_text("idle")


async def test_streamed_reasoning_and_attachments_show(page: Page, tmp_path: Path) -> None:
    resume = threading.Event()
    # Anthropic events: message_start, ping, the thinking block's start and two thinking
    # deltas: the stream holds there until the test has seen the reasoning on the page
    turn = FakeTurn(
        reasoning=["Pondering ", "deeply."], text="It is a cat.", pause_after=5, resume=resume
    )
    with running_fake(in_order(turn)) as fake:
        model = AnthropicModel(
            "claude-fake-1",
            api_key="sk-test",
            base_url=fake.anthropic_base_url,
            max_retries=0,
            thinking_budget=1024,
        )
        async with console(examples_registry(_talker(model)), tmp_path) as c:
            try:
                await c.spawn("/talker/t2")
                image = {"type": "image", "url": "https://example.com/cat.png"}
                sent = await c.http.post(
                    "/_entities/entities/talker/t2/send",
                    json={"payload": "what is this?", "attachments": [image]},
                )
                assert sent.status_code == 202, sent.text
                await page.goto(c.base + "/ui/talker/t2")
                conversation = page.locator(".conversation")
                attached = conversation.locator(".msg.user .attachment a")
                await expect(attached).to_have_text("image: cat.png")
                assert await attached.get_attribute("href") == image["url"]
                thinking = conversation.locator(".msg.reasoning.streaming")
                await expect(thinking).to_contain_text("Pondering deeply.")
                await expect(thinking.locator("summary")).to_have_text("reasoning (streaming…)")
                assert "It is a cat." not in await conversation.inner_text()
            finally:
                resume.set()
            await expect(conversation.locator(".msg.assistant")).to_contain_text("It is a cat.")
            done = conversation.locator(".msg.reasoning")
            await expect(done.locator("summary")).to_have_text("reasoning")
            await expect(thinking).to_have_count(0)
            await expect(done.locator(".text")).to_have_text("Pondering deeply.")


async def test_tool_call_shows_name_arguments_and_result(page: Page, tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path) as c:
        await c.spawn("/assistant/a1", initial_message="what is 2+3")
        await page.goto(c.base + "/ui/assistant/a1")
        call = page.locator(".conversation .tool-call")
        await expect(call.locator(".tool-name")).to_have_text("add")
        await expect(call).to_contain_text('{"a":2,"b":3}')
        await expect(call.locator(".tool-result")).to_have_text("→ 5")
        await expect(page.locator(".conversation .msg.assistant")).to_contain_text(
            "The answer is 5."
        )
        # the raw stream is there, folded away
        raw = page.locator(".raw-view")
        assert await raw.get_attribute("open") is None
        await raw.locator("summary").click()
        await expect(raw.locator(".raw")).to_contain_text("tool_calls")


async def test_send_box_reaches_the_entity(page: Page, tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path) as c:
        await c.spawn("/counter/c1")
        await page.goto(c.base + "/ui/counter/c1")
        box = page.locator(".send-box")
        # checked against the type's inbox schema by the server; its error is shown
        await box.locator("textarea").fill('{"nope": 1}')
        await box.locator("button[type=submit]").click()
        await expect(box.locator(".server-error")).to_contain_text("SCHEMA_VALIDATION_FAILED")
        await expect(box.locator(".server-error")).to_contain_text("add: Field required")
        await box.locator("textarea").fill("{not json")
        await box.locator("button[type=submit]").click()
        await expect(box.locator(".result")).to_contain_text("not JSON")
        await box.locator("textarea").fill('{"add": 3}')
        await box.locator("button[type=submit]").click()
        await expect(box.locator(".result")).to_contain_text("sent")
        await expect(page.locator(".conversation .msg.user")).to_contain_text('{"add":3}')
        await expect(page.locator(".conversation .msg.reply")).to_contain_text("3")
        await expect(page.locator(".state table")).to_contain_text("total")
        listing = (await c.http.get("/_entities/entities/counter/c1")).json()
        assert listing["state"]["totals"]["total"]["value"] == 3
        # kill asks for a second click, then the entity stops
        await page.click("button:has-text('Kill')")
        await page.click("button:has-text('Confirm kill')")
        await expect(page.locator(".entity-head .badge")).to_have_text("stopped")
        await expect(page.locator(".send-box")).to_be_hidden()
        info = (await c.http.get("/_entities/entities/counter/c1")).json()
        assert info["status"] == "stopped"


async def test_spawn_from_the_list_and_from_a_missing_entity(page: Page, tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path) as c:
        await page.goto(c.base + "/ui/")
        form = page.locator(".spawn-form")
        await expect(form.locator("option[value=counter]")).to_have_count(1)
        await form.locator("select").select_option("counter")
        await form.locator("input[name=spawn-id]").fill("c7")
        await form.locator("input[name=spawn-tags]").fill("team=red")
        await form.locator("button[type=submit]").click()
        await expect(page).to_have_url(c.base + "/ui/counter/c7")
        await expect(page.locator(".entity-head .badge")).to_have_text("idle")
        await expect(page.locator(".tags")).to_contain_text("team=red")
        # a deep link to an entity that does not exist (yet) offers to spawn it
        await page.goto(c.base + "/ui/chat/later")
        await expect(page.locator(".notice")).to_contain_text("No entity at /chat/later")
        here = page.locator("form.spawn-here")
        await here.locator("textarea[name=initial_message]").fill("hello there")
        await here.locator("button[type=submit]").click()
        await expect(page.locator(".entity-head .badge")).to_have_text("idle")
        await expect(page.locator(".conversation .msg.user")).to_contain_text("hello there")
        await expect(page.locator(".notice")).to_be_hidden()


async def test_manifest_children_and_schedule_countdown(page: Page, tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path) as c:
        await c.spawn("/fanout/f1")
        sent = await c.http.post("/_entities/entities/fanout/f1/send", json={"payload": {"n": 2}})
        assert sent.status_code == 202
        cron = await c.http.put(
            "/_entities/entities/fanout/f1/schedules/tick", json={"expression": "*/5 * * * *"}
        )
        assert cron.status_code == 200
        await page.goto(c.base + "/ui/fanout/f1")
        children = page.locator(".children")
        await expect(children.locator("a.entity")).to_have_count(2)
        await expect(children).to_contain_text("/square/f1-1-1")
        await expect(children.locator(".badge")).to_have_text(["idle", "idle"])
        await expect(page.locator(".conversation .msg.reply")).to_have_text("reply5")
        countdown = page.locator(".schedules .countdown")
        await expect(countdown).to_contain_text("in ")
        first = await countdown.inner_text()
        await expect(countdown).not_to_have_text(first)  # it ticks
        await children.locator("a.entity", has_text="/square/f1-1-2").click()
        await expect(page).to_have_url(c.base + "/ui/square/f1-1-2")
        await expect(page.locator(".entity-head .meta")).to_contain_text("parent /fanout/f1")


async def test_token_protected_server_after_one_prompt(page: Page, tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path, token=TOKEN) as c:
        await c.spawn("/counter/c1")
        await c.http.post("/_entities/entities/counter/c1/send", json={"payload": {"add": 4}})
        await page.goto(c.base + "/")
        form = page.locator("#auth")
        await expect(form).to_be_visible()
        await expect(form).to_contain_text("needs a bearer token")
        await page.fill("#auth-token", TOKEN)
        await page.click("#auth button[type=submit]")
        await expect(form).to_be_hidden()
        await expect(page.locator(".entity-table")).to_contain_text("/counter/c1")
        await page.click("a.entity:text-is('/counter/c1')")
        # the stream (SSE through fetch, with the header) and the control plane both answer
        await expect(page.locator(".conversation .msg.reply")).to_contain_text("4")
        await page.reload()  # remembered for the tab's session
        await expect(page.locator(".conversation .msg.reply")).to_contain_text("4")
        await expect(form).to_be_hidden()


async def test_wrong_token_says_401_and_asks_again(page: Page, tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path, token=TOKEN) as c:
        await c.spawn("/counter/c1")
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if "/_entities/" in r.url else None)
        await page.goto(c.base + "/ui/")
        form = page.locator("#auth")
        await page.fill("#auth-token", "not-the-token")
        await page.click("#auth button[type=submit]")
        await expect(form).to_contain_text(WRONG_TOKEN_TEXT)
        await expect(form).to_be_visible()
        # it waits for the user: no request loop while the form is up
        settled = len(requests)
        await page.wait_for_timeout(1500)
        assert len(requests) == settled
        await page.fill("#auth-token", TOKEN)
        await page.click("#auth button[type=submit]")
        await expect(form).to_be_hidden()
        await expect(page.locator(".entity-table")).to_contain_text("/counter/c1")


async def test_failed_wakes_and_dead_letters(page: Page, tmp_path: Path) -> None:
    def add(registry: Registry) -> None:
        @registry.define("flaky", description="Always fails", max_attempts=2)
        async def flaky(ctx: HandlerContext, wake: WakeEvent) -> None:
            if wake.messages:
                raise RuntimeError("boom from flaky")

    async with console(examples_registry(add), tmp_path) as c:
        await c.spawn("/flaky/f1", initial_message="go")
        await page.goto(c.base + "/ui/flaky/f1")
        letters = page.locator(".dead-letters")
        await expect(letters).to_contain_text("boom from flaky")
        row = page.locator(".timeline .wake-row").first
        await expect(row.locator(".badge").first).to_have_text("dead_lettered")
        details = row.locator("details.error-details").last
        await expect(details).to_contain_text("attempt 2: RuntimeError: boom from flaky (final)")
        await details.locator("summary").click()
        await expect(details.locator("pre")).to_contain_text("Traceback")
        await expect(page.locator(".entity-head .badge")).to_have_text("failed")
        await letters.locator("button:has-text('Discard')").click()
        await expect(letters).to_have_count(0)
        assert (await c.http.get("/_entities/dead-letters")).json() == []


async def test_an_approval_is_decided_from_the_console(page: Page, tmp_path: Path) -> None:
    async with console(examples_registry(), tmp_path) as c:
        await c.spawn("/approval/p1", initial_message="delete notes.txt")
        await page.goto(c.base + "/ui/approval/p1")
        panel = page.locator(".approvals")
        await expect(panel).to_contain_text("delete_file")
        await expect(panel).to_contain_text("notes.txt")
        await panel.locator("button:has-text('Approve')").click()
        await expect(page.locator(".conversation")).to_contain_text("Done: deleted notes.txt.")
        await expect(panel).to_contain_text("approved")
        [decided] = (await c.http.get("/_entities/entities/approval/p1/approvals")).json()
        assert decided["status"] == "approved"


def _echo(registry: Registry) -> None:
    @registry.define("echo", description="Replies with what it got")
    async def echo(ctx: HandlerContext, wake: WakeEvent) -> None:
        for message in wake.messages:
            ctx.reply(f"echo: {message.text}", to=message)


async def test_a_long_stream_starts_near_its_tail_and_loads_earlier(
    page: Page, tmp_path: Path
) -> None:
    from entities._events import event

    async with console(examples_registry(_echo), tmp_path) as c:
        await c.spawn("/echo/long")
        first = await c.runtime.send("/echo/long", "the very first message")
        async with httpx2.AsyncClient(base_url=c.base, timeout=30) as http:
            path = f"/_entities/entities/echo/long/replies/{first.key}"
            assert (await http.get(path, params={"wait_ms": 10_000})).json()["replies"]
            filler = [event("steps", f"filler/{i}", {"n": i}, 0.0) for i in range(4500)]
            await c.runtime.store.append("echo/long/main", filler)
            last = await c.runtime.send("/echo/long", "the latest message")
            path = f"/_entities/entities/echo/long/replies/{last.key}"
            assert (await http.get(path, params={"wait_ms": 10_000})).json()["replies"]
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/v1/stream/" in r.url else None)
        await page.goto(c.base + "/ui/echo/long")
        conversation = page.locator(".conversation")
        await expect(conversation).to_contain_text("echo: the latest message")
        await expect(conversation).not_to_contain_text("the very first message")
        earlier = page.locator("button.load-earlier")
        await expect(earlier).to_be_visible()
        await earlier.click()  # 2,000 more: not yet the start
        await expect(earlier).to_be_visible()
        await earlier.click()
        await expect(earlier).to_be_hidden()
        await expect(conversation).to_contain_text("echo: the very first message")
        await expect(conversation).to_contain_text("echo: the latest message")
        live = [u for u in streams if "live=sse" in u]
        assert live and all("offset=-1" not in u for u in live), live
