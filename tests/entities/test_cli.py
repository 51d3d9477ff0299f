"""The ``entities`` console script, run as a real subprocess.

``run`` works in-process over a SQLite file; the client commands talk to a real
``entities serve examples.all:registry`` subprocess.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from ._support import REPO, EntitiesProcess, cli_env, entities_command, free_port


@dataclass
class Result:
    code: int
    out: str
    err: str


def entities(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    proc = subprocess.run(
        [*entities_command(), *args],
        cwd=REPO,
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    result = entities(*args, env=env)
    assert result.code == 0, (args, result)
    return result.out


def fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Run a command that must fail; return stdout and stderr together."""
    result = entities(*args, env=env)
    assert result.code != 0, (args, result)
    assert "Traceback" not in result.err, result.err
    return result.out + result.err


# -- run (in-process) -------------------------------------------------------------------------


def test_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "entities.cli", "--help"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("serve", "worker", "run", "spawn", "send", "ps", "inspect", "kill"):
        assert command in proc.stdout


def test_run_counter_accumulates_across_processes(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    app = "examples/counter.py:registry"
    assert ok("run", app, "/counter/c1", '{"add": 5}', "--json", "--db", db).strip() == "5"
    assert ok("run", app, "/counter/c1", '{"add": 7}', "--json", "--db", db).strip() == "12"
    assert ok("run", app, "/counter/c2", '{"add": -3}', "--json", "--db", db).strip() == "-3"


def test_run_chat_replies_and_on_message_answers(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    app = "examples/chat.py:registry"
    reply = ok("run", app, "/chat/c1", "hello there", "--db", db).strip()
    assert reply == "You said 'hello there'. I remember 1 messages."
    empty = ok("run", app, "/chat/c1", "   ", "--db", db).strip()
    assert empty == "Please send a non-empty text message."
    second = ok("run", app, "/chat/c1", "again", "--db", db).strip()
    assert second == "You said 'again'. I remember 3 messages."
    # a failed run: the on_error hook's reply is printed, then the error, and the exit status
    # says it failed (1)
    sorry = entities("run", app, "/chat/c1", "boom", "--db", db)
    assert sorry.code == 1, sorry
    assert sorry.out.startswith("Sorry, something went wrong")
    assert sorry.err.strip().endswith(
        "error: the wake was dead-lettered: RuntimeError: the user asked for a failure"
    )


def test_run_bad_inputs(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    app = "examples/counter.py:registry"
    assert "UNKNOWN_ENTITY_TYPE" in fails(
        "run", app, "/nosuch/x", '{"add": 1}', "--json", "--db", db
    )
    assert "not valid JSON" in fails("run", app, "/counter/c1", "{add: 1", "--json", "--db", db)
    assert "SCHEMA_VALIDATION_FAILED" in fails(
        "run", app, "/counter/c1", '{"add": "x"}', "--json", "--db", db
    )
    assert "INVALID_URL" in fails("run", app, "counter", '{"add": 1}', "--json", "--db", db)
    assert "no such file" in fails(
        "run", "examples/nosuch.py:registry", "/counter/c1", "{}", "--db", db
    )
    assert "is not an entities.Registry" in fails(
        "run", "examples/counter.py:nothing", "/counter/c1", "{}", "--db", db
    )
    # None of that created or changed anything: the next add starts from zero.
    assert ok("run", app, "/counter/c1", '{"add": 2}', "--json", "--db", db).strip() == "2"


# -- client commands against a real server ----------------------------------------------------


@dataclass
class Server:
    url: str
    process: EntitiesProcess

    def args(self, *args: str) -> list[str]:
        return [*args, "--server", self.url]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("cli")
    port = free_port()
    process = EntitiesProcess(
        [
            "serve",
            "examples.all:registry",
            "--db",
            f"sqlite:///{directory / 'serve.db'}",
            "--port",
            str(port),
            "--deploy-version",
            "cli-test-1",
        ],
        log=directory / "serve.log",
        port=port,
    )
    process.start()
    try:
        yield Server(f"http://127.0.0.1:{port}", process)
    finally:
        process.stop()
    assert process.proc is not None and process.proc.returncode == 0, process.output()


def test_workers_lists_the_servers_own_worker(server: Server) -> None:
    deadline = time.monotonic() + 10
    listed: list[Any] = []
    while not listed and time.monotonic() < deadline:  # it announces itself as it starts
        listed = orjson.loads(ok(*server.args("workers", "-o", "json")))
        time.sleep(0.05)
    assert [(w["pid"], w["live"]) for w in listed] == [(server.process.pid, True)]
    assert listed[0]["expires"] > time.time()
    from examples.all import registry

    names = sorted(t.name for t in registry.list())
    assert (listed[0]["types"], listed[0]["deploy_version"]) == (names, "cli-test-1")
    table = ok(*server.args("workers")).splitlines()
    assert table[0].split()[:2] == ["WORKER", "LIVE"]
    assert table[0].split()[-2:] == ["VERSION", "TYPES"]
    assert table[1].split()[:2] == [listed[0]["id"], "yes"]
    assert table[1].split()[-2:] == ["cli-test-1", ",".join(names)]


def test_types(server: Server) -> None:
    from examples.all import registry

    expected = {t.name for t in registry.list()}
    assert {"chat", "counter"} <= expected
    lines = ok(*server.args("types")).splitlines()
    assert {line.split()[0] for line in lines} == expected
    described = orjson.loads(ok(*server.args("types", "-o", "json")))
    assert {t["name"] for t in described} == expected


def test_spawn_send_wait_ps_inspect_view_kill(server: Server) -> None:
    assert ok(*server.args("spawn", "/counter/k1", "--tag", "team=red")).strip() == (
        "spawned /counter/k1"
    )
    assert "DUPLICATE_URL" in fails(*server.args("spawn", "/counter/k1"))
    assert ok(*server.args("send", "/counter/k1", '{"add": 3}', "--json", "--wait", "10")) == "3\n"
    assert ok(*server.args("send", "/counter/k1", '{"add": 4}', "--json", "--wait", "10")) == "7\n"
    receipt = orjson.loads(
        ok(*server.args("send", "/counter/k1", '{"add": 1}', "--json", "-o", "json"))
    )
    assert receipt["url"] == "/counter/k1" and receipt["key"]

    def total() -> Any:
        inspected = orjson.loads(ok(*server.args("inspect", "/counter/k1", "-o", "json")))
        assert inspected["url"] == "/counter/k1"
        assert inspected["tags"] == {"team": "red"}
        return inspected["state"]["totals"]["total"]["value"]

    # The un-awaited send lands too; wait for it through the replies endpoint.
    assert ok(
        *server.args("send", "/counter/k1", '{"add": 10}', "--json", "--wait", "10")
    ).strip() in ("18",)
    assert total() == 18

    listed = orjson.loads(ok(*server.args("ps", "-o", "json")))
    assert "/counter/k1" in {item["url"] for item in listed}
    by_tag = orjson.loads(ok(*server.args("ps", "-o", "json", "--tag", "team=red")))
    assert [item["url"] for item in by_tag] == ["/counter/k1"]
    table = ok(*server.args("ps", "--type", "counter"))
    assert table.splitlines()[0].startswith("URL")
    assert any(line.startswith("/counter/k1") for line in table.splitlines()[1:])

    viewed = ok(*server.args("view", "/counter/k1", "-o", "json"))
    events = [orjson.loads(line) for line in viewed.splitlines()]
    assert events[0]["type"] == "entity_created"
    payloads = [e["value"]["payload"] for e in events if e["type"] == "inbox"]
    assert payloads == [{"add": 3}, {"add": 4}, {"add": 1}, {"add": 10}]
    human = ok(*server.args("view", "/counter/k1"))
    assert "inbox" in human and "entity_created" in human

    assert ok(*server.args("kill", "/counter/k1")).strip() == "/counter/k1 stopped"
    assert "ENTITY_STOPPED" in fails(*server.args("send", "/counter/k1", '{"add": 1}', "--json"))
    stopped = orjson.loads(ok(*server.args("ps", "-o", "json", "--status", "stopped")))
    assert "/counter/k1" in {item["url"] for item in stopped}
    assert total() == 18


def test_delete_needs_purge_then_frees_the_url(server: Server) -> None:
    ok(*server.args("spawn", "/counter/d1"))
    assert ok(*server.args("send", "/counter/d1", '{"add": 5}', "--json", "--wait", "10")) == "5\n"
    refused = entities(*server.args("delete", "/counter/d1"))
    assert refused.code == 2 and refused.out == "", refused
    assert len(refused.err.strip().splitlines()) == 1, refused.err
    assert "--purge" in refused.err and "entities kill" in refused.err
    assert ok(*server.args("inspect", "/counter/d1", "-o", "json"))  # still there
    assert ok(*server.args("delete", "/counter/d1", "--purge")) == "purged /counter/d1\n"
    assert "ENTITY_NOT_FOUND" in fails(*server.args("inspect", "/counter/d1"))
    missing = entities(*server.args("delete", "/counter/d1", "--purge"))
    assert missing.code != 0 and "ENTITY_NOT_FOUND" in missing.err
    assert len(missing.err.strip().splitlines()) == 1, missing.err
    ok(*server.args("spawn", "/counter/d1"))  # the URL is free: a new counter, from zero
    assert ok(*server.args("send", "/counter/d1", '{"add": 1}', "--json", "--wait", "10")) == "1\n"
    done = orjson.loads(
        ok(*server.args("delete", "/counter/d1", "--purge", "--recursive", "-o", "json"))
    )
    assert done == {"purged": ["/counter/d1"]}


def test_chat_over_the_server(server: Server) -> None:
    ok(*server.args("spawn", "/chat/t1"))
    reply = ok(*server.args("send", "/chat/t1", "hi", "--wait", "10")).strip()
    assert reply == "You said 'hi'. I remember 1 messages."
    empty = ok(*server.args("send", "/chat/t1", "", "--wait", "10")).strip()
    assert empty == "Please send a non-empty text message."


def test_client_bad_inputs(server: Server) -> None:
    before = ok(*server.args("ps", "-o", "json"))
    assert "UNKNOWN_ENTITY_TYPE" in fails(*server.args("spawn", "/nosuch/x"))
    assert "UNKNOWN_ENTITY_TYPE" in fails(*server.args("send", "/nosuch/x", "hi"))
    assert "ENTITY_NOT_FOUND" in fails(
        *server.args("send", "/counter/ghost", '{"add": 1}', "--json")
    )
    assert "ENTITY_NOT_FOUND" in fails(*server.args("inspect", "/counter/ghost"))
    assert "ENTITY_NOT_FOUND" in fails(*server.args("kill", "/counter/ghost"))
    assert "not valid JSON" in fails(*server.args("send", "/counter/k1", "{add", "--json"))
    assert "not valid JSON" in fails(*server.args("spawn", "/counter/k9", "--args", "{x"))
    assert "INVALID_URL" in fails(*server.args("spawn", "/counter/bad id"))
    assert "expected key=value" in fails(*server.args("spawn", "/counter/k8", "--tag", "team"))
    ok(*server.args("spawn", "/counter/k2"))
    assert "SCHEMA_VALIDATION_FAILED" in fails(
        *server.args("send", "/counter/k2", '{"add": "x"}', "--json")
    )
    after = orjson.loads(ok(*server.args("ps", "-o", "json")))
    assert {i["url"] for i in after} == {i["url"] for i in orjson.loads(before)} | {"/counter/k2"}


def test_server_not_reachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["ps"], ["types"], ["send", "/counter/x", "hi"], ["inspect", "/counter/x"]):
        message = fails(*args, "--server", url)
        assert "cannot reach" in message and "entities serve" in message
    message = fails("ps", env={"ENTITIES_URL": url})
    assert "cannot reach" in message
    for args in (["view", "/counter/x"], ["observe", "/counter/x"]):
        assert "cannot reach" in fails(*args, "--server", url)


def test_view_of_a_missing_entity(server: Server) -> None:
    assert "NOT_FOUND" in fails(*server.args("view", "/counter/ghost"))


class Lines:
    """Lines of a subprocess's stdout, read by a thread, awaited with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self.queue.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, predicate: Callable[[Any], bool], seconds: float = 15) -> Any:
        deadline = time.monotonic() + seconds
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no matching line in time") from None
            item = orjson.loads(line)
            if predicate(item):
                return item


def test_observe_tails_live_and_survives_a_server_restart(tmp_path: Path) -> None:
    port = free_port()
    args = ["serve", "examples.all:registry", "--db", f"sqlite:///{tmp_path / 'o.db'}"]
    serve = EntitiesProcess([*args, "--port", str(port)], log=tmp_path / "serve.log", port=port)
    serve.start()
    url = f"http://127.0.0.1:{port}"
    ok("spawn", "/counter/o1", "--server", url)
    observer = subprocess.Popen(
        [*entities_command(), "observe", "/counter/o1", "-o", "json", "--server", url],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = Lines(observer)
        assert lines.until(lambda e: True)["type"] == "entity_created"
        ok("send", "/counter/o1", '{"add": 2}', "--json", "--server", url)
        reply = lines.until(lambda e: e["type"] == "texts")
        assert reply["value"]["value"] == 2
        serve.stop()  # the live tail ends; observe keeps trying
        time.sleep(0.5)
        assert observer.poll() is None
        serve.start()
        ok("send", "/counter/o1", '{"add": 3}', "--json", "--server", url)
        reply = lines.until(lambda e: e["type"] == "texts" and e["value"]["value"] == 5)
        assert reply["headers"]["operation"] == "insert"
    finally:
        observer.terminate()
        _, err = observer.communicate(timeout=10)
        serve.stop()
    assert "Traceback" not in err, err


def test_token_protected_server(tmp_path: Path) -> None:
    port = free_port()
    process = EntitiesProcess(
        [
            *("serve", "examples.all:registry", "--db", f"sqlite:///{tmp_path / 't.db'}"),
            *("--port", str(port), "--token", "tok3n"),
        ],
        log=tmp_path / "serve.log",
        port=port,
    )
    process.start()
    try:
        url = f"http://127.0.0.1:{port}"
        hint = "pass --token TOKEN or set ENTITIES_TOKEN"
        for args in (["spawn", "/counter/a"], ["ps"], ["view", "/counter/a"]):
            refused = entities(*args, "--server", url)
            assert refused.code == 2, refused  # refused: a usage error
            assert refused.err.strip() == (
                f"Error: UNAUTHORIZED: the server requires a bearer token; {hint} "
                "(the token `entities serve --token` uses)"
            )
        wrong = entities("spawn", "/counter/a", "--server", url, "--token", "nope")
        assert wrong.code == 2 and "refused the token given" in wrong.err and hint in wrong.err
        env_wrong = fails("spawn", "/counter/a", "--server", url, env={"ENTITIES_TOKEN": "nope"})
        assert "refused the token given" in env_wrong
        right = {"ENTITIES_TOKEN": "tok3n"}
        assert orjson.loads(ok("ps", "-o", "json", "--server", url, env=right)) == []
        ok("spawn", "/counter/a", "--server", url, "--token", "tok3n")
        answer = ok(
            "send", "/counter/a", '{"add": 2}', "--json", "--wait", "10", "--server", url, env=right
        )
        assert answer.strip() == "2"
        flag = ("--server", url, "--token", "tok3n")
        assert ok("send", "/counter/a", '{"add": 1}', "--json", "--wait", "10", *flag) == "3\n"
        assert ok("inspect", "/counter/a", *flag).startswith("/counter/a  (counter)")
    finally:
        process.stop()


def test_serve_on_a_port_in_use_fails_cleanly(server: Server, tmp_path: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    args = ["serve", "examples.all:registry", "--db", f"sqlite:///{tmp_path / 'p.db'}"]
    for log_format in ("text", "json"):
        result = entities("--log-format", log_format, *args, "--port", port)
        assert result.code == 1 and result.out == "", result
        assert result.err == f"error: cannot serve on 127.0.0.1:{port} (address already in use)\n"
    assert not (tmp_path / "p.db").exists()  # said before the store was opened


def test_serve_on_port_zero_reports_the_real_port(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *(*entities_command(), "serve", "examples.all:registry", "--port", "0"),
            *("--db", f"sqlite:///{tmp_path / 'z.db'}"),
        ],
        cwd=REPO,
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("entities: serving http://127.0.0.1:"), first
        url = first.split()[2]
        assert not url.endswith(":0")
        assert orjson.loads(ok("ps", "-o", "json", "--server", url)) == []
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_view_pages_through_a_long_stream(server: Server) -> None:
    ok(*server.args("spawn", "/chat/long"))
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        for i in range(300):
            response = http.post(
                "/_entities/entities/chat/long/send", json={"payload": {"text": f"m{i}"}}
            )
            assert response.status_code == 202
        wait_for_idle(http, "/chat/long")
        events: list[Any] = []
        offset = "-1"
        while True:
            page = http.get("/v1/stream/chat/long/main", params={"offset": offset})
            events.extend(page.json())
            offset = page.headers["stream-next-offset"]
            if page.headers.get("stream-up-to-date") == "true":
                break
    assert len(events) > 1000  # more than one page of the streams server
    viewed = [
        orjson.loads(line)
        for line in ok(*server.args("view", "/chat/long", "-o", "json")).splitlines()
    ]
    assert viewed == events
    # --last: only the tail, read from near it
    last = [
        orjson.loads(line)
        for line in ok(*server.args("view", "/chat/long", "--last", "7", "-o", "json")).splitlines()
    ]
    assert last == events[-7:]
    assert ok(*server.args("view", "/chat/long", "--last", "0")) == ""
    everything = ok(*server.args("view", "/chat/long", "--last", "100000", "-o", "json"))
    assert [orjson.loads(line) for line in everything.splitlines()] == events


def wait_for_idle(http: httpx2.Client, url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        info = http.get(f"/_entities/entities{url}").json()
        if not info["pending"] and info["status"] == "idle":
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def test_send_wait_tells_the_truth_and_dead_letters_can_be_retried(server: Server) -> None:
    ok(*server.args("spawn", "/chat/dl"))
    # a wake given up: the on_error reply, then the error; exit status 1
    given_up = entities(*server.args("send", "/chat/dl", "boom", "--wait", "20"))
    assert given_up.code == 1, given_up
    assert given_up.out.startswith("Sorry, something went wrong")
    assert "error: the wake was dead-lettered: RuntimeError" in given_up.err
    # no answer in time: exit status 3 (a fanout job answers only when its children finish)
    ok(*server.args("spawn", "/fanout/slow"))
    late = entities(
        *server.args("send", "/fanout/slow", '{"n": 1, "delay_ms": 60000}', "--json", "--wait", "1")
    )
    assert late.code == 3 and "no reply within 1 s" in late.err, late
    refused = entities(*server.args("send", "/chat/nobody", "hi", "--wait", "1"))
    assert refused.code == 2 and "ENTITY_NOT_FOUND" in refused.err, refused  # a usage error
    assert "/chat/dl" in ok(*server.args("ps", "--status", "failed"))
    [letter] = orjson.loads(ok(*server.args("dead-letters", "--url", "/chat/dl", "-o", "json")))
    assert letter["url"] == "/chat/dl" and letter["attempts"] == 1 and letter["messages"] == 1
    assert letter["error"] == "RuntimeError: the user asked for a failure"
    table = ok(*server.args("dead-letters"))
    assert letter["id"] in table and "RuntimeError" in table
    assert ok(*server.args("retry", letter["id"])).strip() == f"retried {letter['id']} (/chat/dl)"
    assert "DEAD_LETTER_NOT_FOUND" in fails(*server.args("retry", letter["id"]))
    assert "DEAD_LETTER_NOT_FOUND" in fails(*server.args("discard", "chat:dl:w9-9"))
    # the retried "boom" fails again: a new dead letter, which can be discarded
    deadline = time.monotonic() + 20
    letters: list[Any] = []
    while not letters:
        assert time.monotonic() < deadline
        letters = orjson.loads(ok(*server.args("dead-letters", "--url", "/chat/dl", "-o", "json")))
        time.sleep(0.1)
    assert letters[0]["id"] != letter["id"]
    assert ok(*server.args("discard", letters[0]["id"])).strip() == f"discarded {letters[0]['id']}"
    assert orjson.loads(ok(*server.args("dead-letters", "-o", "json"))) == []
    assert "/chat/dl" not in ok(*server.args("ps", "--status", "failed"))


def test_inspect_summary(server: Server) -> None:
    ok(*server.args("spawn", "/fanout/i1", "--tag", "team=blue"))
    assert ok(
        *server.args("send", "/fanout/i1", '{"n": 2, "delay_ms": 0}', "--json", "--wait", "20")
    )
    ok(*server.args("schedules", "/fanout/i1", "--set", "daily", "--cron", "0 9 * * *"))
    lines = ok(*server.args("inspect", "/fanout/i1")).splitlines()
    assert lines[0] == "/fanout/i1  (fanout)"
    fields = {line[2:15].strip(): line[15:] for line in lines[1:] if line[2:3] != " "}
    assert fields["status"] == "idle" and fields["parent"] == "-"
    assert fields["tags"] == "team=blue" and fields["dead letters"] == "0"
    assert int(fields["runs"]) >= 2 and "completed" in fields["last run"]
    assert fields["created"].startswith("20") and fields["last active"].startswith("20")
    assert "latest error" not in fields
    assert "  children (2)" in lines and "  schedules (1)" in lines
    children = [line.strip() for line in lines if line.startswith("    /square/")]
    assert sorted(children) == ["/square/i1-1-1", "/square/i1-1-2"]
    [cron] = [line.split() for line in lines if line.startswith("    cron:daily")]
    assert cron[1:4] == ["cron", "active", "next"] and cron[5:7] == ["0", "9"]
    assert lines[-1] == (
        "(all of it, state and manifest included: entities inspect /fanout/i1 --output json)"
    )
    everything = orjson.loads(ok(*server.args("inspect", "/fanout/i1", "--output", "json")))
    assert everything["url"] == "/fanout/i1" and "manifest" in everything
    # a failed entity shows its dead letters and its latest error
    ok(*server.args("spawn", "/chat/i2"))
    assert entities(*server.args("send", "/chat/i2", "boom", "--wait", "20")).code == 1
    failed = ok(*server.args("inspect", "/chat/i2"))
    assert "  status       failed\n" in failed
    assert "  dead letters 1 (entities dead-letters --url /chat/i2)\n" in failed
    assert "  latest error RuntimeError: the user asked for a failure (wake " in failed


def test_schedules_list_set_cancel(server: Server) -> None:
    ok(*server.args("spawn", "/counter/s1"))
    assert ok(*server.args("schedules", "/counter/s1")) == "no schedules\n"
    assert orjson.loads(ok(*server.args("schedules", "/counter/s1", "-o", "json"))) == []
    made = ok(
        *server.args("schedules", "/counter/s1", "--set", "daily", "--cron", "0 9 * * *"),
        *("--timezone", "Europe/Paris", "--payload", '{"add": 1}'),
    ).splitlines()
    assert made[0].split() == ["ID", "KIND", "STATUS", "WHEN", "WHAT"]
    assert made[1].startswith("cron:daily") and '(Europe/Paris) {"add":1}' in made[1]
    replaced = orjson.loads(
        ok(
            *server.args(
                "schedules", "/counter/s1", "--set", "cron:daily", "--cron", "*/5 * * * *"
            ),
            *("-o", "json"),
        )
    )
    assert replaced["id"] == "cron:daily" and replaced["expression"] == "*/5 * * * *"
    assert replaced["timezone"] == "UTC" and replaced["status"] == "active"
    [listed] = orjson.loads(ok(*server.args("schedules", "/counter/s1", "-o", "json")))
    assert listed["expression"] == "*/5 * * * *"
    table = ok(*server.args("schedules", "/counter/s1")).splitlines()
    assert len(table) == 2 and "*/5 * * * * (UTC)" in table[1]
    assert ok(*server.args("schedules", "/counter/s1", "--cancel", "daily")) == "cancelled daily\n"
    [cancelled] = orjson.loads(ok(*server.args("schedules", "/counter/s1", "-o", "json")))
    assert cancelled["status"] == "cancelled"
    again = entities(*server.args("schedules", "/counter/s1", "--cancel", "daily"))
    assert again.code == 2 and "SCHEDULE_NOT_FOUND" in again.err
    bad = entities(*server.args("schedules", "/counter/s1", "--set", "x", "--cron", "nope"))
    assert bad.code == 2 and "invalid cron expression 'nope'" in bad.err
    assert "ENTITY_NOT_FOUND" in fails(*server.args("schedules", "/counter/ghost"))
    assert "not valid JSON" in fails(
        *server.args("schedules", "/counter/s1", "--set", "y", "--cron", "* * * * *"),
        *("--payload", "{x"),
    )


def test_output_json_everywhere(server: Server) -> None:
    spawned = orjson.loads(ok(*server.args("spawn", "/counter/j1", "-o", "json")))
    assert spawned["url"] == "/counter/j1" and spawned["status"] == "idle"
    answer = orjson.loads(
        ok(
            *server.args(
                "send", "/counter/j1", '{"add": 4}', "--json", "--wait", "10", "-o", "json"
            )
        )
    )
    assert answer["url"] == "/counter/j1" and answer["replies"] == [4]
    assert answer["status"] == "completed" and answer["error"] is None and answer["key"]
    ok(*server.args("spawn", "/chat/j2"))
    receipt = orjson.loads(ok(*server.args("send", "/chat/j2", "hi", "-o", "json")))
    assert receipt["url"] == "/chat/j2" and receipt["key"] and receipt["offset"]
    killed = orjson.loads(ok(*server.args("kill", "/counter/j1", "-o", "json")))
    assert killed["status"] == "stopped"


def test_fork(server: Server) -> None:
    ok(*server.args("spawn", "/counter/fk"))
    assert ok(*server.args("send", "/counter/fk", '{"add": 3}', "--json", "--wait", "10")) == "3\n"
    assert ok(*server.args("fork", "/counter/fk", "fk2")).strip() == (
        "/counter/fk2 forked from /counter/fk"
    )
    assert ok(*server.args("send", "/counter/fk2", '{"add": 4}', "--json", "--wait", "10")) == "7\n"
    assert ok(*server.args("send", "/counter/fk", '{"add": 1}', "--json", "--wait", "10")) == "4\n"
    assert "DUPLICATE_URL" in fails(*server.args("fork", "/counter/fk", "fk2"))
    assert "INVALID_FORK_POINT" in fails(*server.args("fork", "/counter/fk", "fk3", "--at", "x"))
    made = orjson.loads(
        ok(*server.args("fork", "/counter/fk", "fk4", "--at", "latest_completed_run", "-o", "json"))
    )
    assert made["url"] == "/counter/fk4"


def test_send_with_attachments(server: Server) -> None:
    ok(*server.args("spawn", "/chat/att"))
    image = "https://example.com/cat.png"
    ok(*server.args("send", "/chat/att", "look", "--attach", f"image={image}",
                    "--attach", "file=stream:/uploads/notes.txt"))  # fmt: skip
    events = [
        orjson.loads(line)
        for line in ok(*server.args("view", "/chat/att", "-o", "json")).splitlines()
    ]
    (row,) = [e["value"] for e in events if e["type"] == "inbox"]
    assert row["attachments"] == [
        {"type": "image", "url": image, "name": "cat.png", "mime": "image/png"},
        {"type": "file", "stream": "/uploads/notes.txt", "name": "notes.txt", "mime": "text/plain"},
    ]
    assert "use TYPE=URL" in fails(*server.args("send", "/chat/att", "x", "--attach", "cat.png"))
    refused = fails(*server.args("send", "/chat/att", "x", "--attach", "sticker=https://x/y"))
    assert "SCHEMA_VALIDATION_FAILED" in refused and "attachments" in refused
