"""What a new user runs into first: bad ``--db`` URLs, a PostgreSQL that is down or refuses,
read-only commands on a database that is not there, the old ``--json`` output flag, unknown
statuses, and the log options (``-v``, ``--log-format json``, ``serve --access-log``).

Most run the command in-process (click's CliRunner); the log tests run real processes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import orjson
import pytest
from click.testing import CliRunner, Result

from entities.cli import _server_cmds as server_cmds
from entities.cli import cli
from entities.cli._db import FORMS, sqlite_file
from entities.cli._logs import OURS, UVICORN, JsonFormatter, adopt_uvicorn_loggers
from streams import sqlite_path
from tests import _postgres

from ._support import REPO, EntitiesProcess, cli_env, entities_command, free_port

COUNTER = f"{REPO}/examples/counter.py:registry"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI configures logging for its process; give the next test the logging it had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = (*OURS, "entities.cli", *UVICORN)
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (old_level, propagate) in saved.items():
        logging.getLogger(name).setLevel(old_level)
        logging.getLogger(name).propagate = propagate
    logging.getLogger("uvicorn.access").filters.clear()


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def one_line(result: Result) -> str:
    """The command's only line (stderr), checked to be the only output and no traceback."""
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# -- --db ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["demo.db", "mysql://app@db.internal/app", "redis://x"])
def test_a_db_that_is_no_store_url_is_one_line(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    expected = f"error: --db {url!r} is not a store URL; use {FORMS}"
    commands = [
        ("run", COUNTER, "/counter/c1", '{"add": 1}', "--json"),
        ("replay", "/counter/c1"),
        ("serve", COUNTER),
        ("worker", COUNTER),
    ]
    for command in commands:
        result = invoke(*command, "--db", url)
        assert result.exit_code == 2, (command, result.output)
        assert one_line(result) == expected
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_the_db_from_the_environment_is_named_so(tmp_path: Path) -> None:
    result = invoke("replay", "/counter/c1", env={"ENTITIES_DB": "demo.db"})
    assert result.exit_code == 2
    assert one_line(result).startswith("error: ENTITIES_DB 'demo.db' is not a store URL; use ")
    given = invoke("replay", "/counter/c1", "--db", "x.db", env={"ENTITIES_DB": "x.db"})
    assert one_line(given).startswith("error: --db 'x.db' is not a store URL")


def test_the_cli_reads_sqlite_paths_as_the_store_does() -> None:
    for url in ["sqlite:///x.db", "sqlite:////tmp/x.db", "sqlite://x.db", "sqlite:///a/b.db?x=1"]:
        assert sqlite_file(url) == sqlite_path(url), url


def test_a_sqlite_url_without_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("run", COUNTER, "/counter/c1", "hi", "--db", "sqlite://")
    assert result.exit_code == 2
    assert one_line(result) == f"error: --db 'sqlite://' names no file; use {FORMS}"


def test_replay_never_creates_a_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url, path in [
        ("sqlite:///.entities/entities.db", ".entities/entities.db"),
        (f"sqlite:///{tmp_path}/a/b/x.db", f"{tmp_path}/a/b/x.db"),
    ]:
        for app in ((), ("--app", COUNTER)):
            result = invoke("replay", "/counter/c1", "--db", url, *app)
            assert result.exit_code == 2
            assert one_line(result) == f"error: no database at {path} (--db {url})"
    # the default --db too
    assert one_line(invoke("replay", "/counter/c1")).startswith("error: no database at .entities")
    assert list(tmp_path.iterdir()) == []


def test_replay_writes_nothing(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    assert invoke("run", COUNTER, "/counter/c1", '{"add": 2}', "--json", "--db", db).stdout == "2\n"
    before = (tmp_path / "x.db").stat().st_mtime_ns, (tmp_path / "x.db").stat().st_size
    replayed = invoke("replay", "/counter/c1", "--db", db, "--app", COUNTER)
    assert replayed.exit_code == 0 and "no divergence" in replayed.stdout, replayed.output
    assert ((tmp_path / "x.db").stat().st_mtime_ns, (tmp_path / "x.db").stat().st_size) == before


def test_a_refused_postgres_is_one_line_at_once() -> None:
    url = f"postgresql://app:secret@127.0.0.1:{free_port()}/app"
    for command in [("run", COUNTER, "/counter/c1", "hi"), ("replay", "/counter/c1")]:
        started = time.monotonic()
        result = invoke(*command, "--db", url)
        assert result.exit_code == 1, result.output
        line = one_line(result)
        assert line.startswith("error: cannot reach PostgreSQL at 127.0.0.1:"), line
        assert "(Connection refused)" in line and FORMS in line
        assert "secret" not in line and "app:***@" in line
        assert time.monotonic() - started < 5  # not the store's 15 s of retries


def test_serve_and_worker_wait_for_postgres_then_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_cmds, "DB_WAIT_SECONDS", 1.0)
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    for command in ("serve", "worker"):
        result = invoke(command, COUNTER, "--db", url)
        assert result.exit_code == 1, result.output
        waiting, error = result.stderr.splitlines()
        assert "waiting up to 1 s for PostgreSQL at 127.0.0.1:" in waiting
        assert error.startswith("error: cannot reach PostgreSQL at 127.0.0.1:")


def test_a_postgres_that_refuses_the_database_is_one_line() -> None:
    _postgres.check()
    url = _postgres.server_url().rsplit("/", 1)[0] + "/no_such_database_here"
    url = url.replace("://postgres@", "://postgres:secret@")
    result = invoke("run", COUNTER, "/counter/c1", "hi", "--db", url)
    assert result.exit_code == 1, result.output
    line = one_line(result)
    assert line.startswith("error: cannot open --db 'postgresql://postgres:***@"), line
    assert 'InvalidCatalogNameError: database "no_such_database_here" does not exist' in line


def test_run_and_replay_on_postgres() -> None:
    _postgres.check()
    url = _postgres.fresh_url()
    try:
        ran = invoke("run", COUNTER, "/counter/p1", '{"add": 5}', "--json", "--db", url)
        assert (ran.exit_code, ran.stdout) == (0, "5\n"), ran.output
        replayed = invoke("replay", "/counter/p1", "--db", url, "-o", "json")
        assert replayed.exit_code == 0, replayed.output
        assert orjson.loads(replayed.stdout)["ok"] is True
    finally:
        _postgres.drop_schema_sync(url)


# -- flags --------------------------------------------------------------------------------------


def test_the_old_json_output_flag_says_what_replaced_it() -> None:
    for command in (["ps"], ["types"], ["view", "/counter/c1"], ["replay", "/counter/c1"]):
        result = invoke(*command, "--json")
        assert result.exit_code == 2, (command, result.output)
        assert "--json is now --output json here" in result.stderr
        assert "Traceback" not in result.stderr


def test_help_names_output_token_and_the_meaning_of_json() -> None:
    client = ["spawn", "send", "view", "observe", "ps", "inspect", "schedules", "kill", "fork"]
    client += ["signal"]
    client += ["types", "workers", "dead-letters", "retry", "discard"]
    for command in client:
        text = invoke(command, "--help").stdout
        assert "--token" in text and "ENTITIES_TOKEN" in text, command
        assert "--output [text|json]" in text, command
    for command in ("run", "replay"):
        assert "--output [text|json]" in invoke(command, "--help").stdout
    for command in ("send", "run"):
        assert "MESSAGE is JSON" in invoke(command, "--help").stdout
    top = invoke("--help").stdout
    assert "--log-format [text|json]" in top and "schedules" in top
    assert "--access-log" in invoke("serve", "--help").stdout


def test_ps_rejects_an_unknown_status() -> None:
    result = invoke("ps", "--status", "sleeping")
    assert result.exit_code == 2
    assert (
        "'sleeping' is not one of 'idle', 'running', 'stopped', 'paused', 'failed'" in result.stderr
    )


def test_schedules_options_that_do_not_go_together() -> None:
    for args, message in [
        (["--set", "daily"], "--set ID needs --cron EXPR"),
        (["--cron", "* * * * *"], "--set ID needs --cron EXPR"),
        (["--set", "a", "--cron", "* * * * *", "--cancel", "a"], "do not go together"),
        (["--timezone", "UTC"], "--timezone and --payload go with --set"),
    ]:
        result = invoke("schedules", "/counter/c1", *args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)


# -- logs ---------------------------------------------------------------------------------------


def test_json_log_lines() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "entities.wake", logging.INFO, __file__, 1, "woke %s", ("/a/b",), None
    )
    record.__dict__.update({"url": "/a/b", "duration_ms": 1.5, "odd": object()})
    line = orjson.loads(formatter.format(record))
    assert line["level"] == "INFO" and line["logger"] == "entities.wake"
    assert line["message"] == "woke /a/b" and line["url"] == "/a/b" and line["duration_ms"] == 1.5
    assert line["time"].endswith("Z") and "object" in line["odd"]
    try:
        raise ValueError("bad")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: bad" in orjson.loads(formatter.format(failed))["exc_info"]


@pytest.mark.parametrize(
    ("flags", "ours", "theirs"),
    [
        ([], logging.WARNING, logging.WARNING),
        (["-v"], logging.INFO, logging.WARNING),
        (["-vv"], logging.DEBUG, logging.WARNING),
        (["-vvv"], logging.DEBUG, logging.DEBUG),
    ],
)
def test_verbosity_levels(flags: list[str], ours: int, theirs: int) -> None:
    assert invoke(*flags, "ps", "--status", "sleeping").exit_code == 2  # the group ran
    for name in ("entities", "entities.wake", "streams.postgres"):
        assert logging.getLogger(name).getEffectiveLevel() == ours, name
    for name in ("asyncio", "httpx", "httpcore", "asyncpg", "aiosqlite", "anthropic", "openai"):
        assert logging.getLogger(name).getEffectiveLevel() == theirs, name


def test_uvicorn_loggers_are_adopted() -> None:
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = [logging.NullHandler()]
    access.propagate = False
    adopt_uvicorn_loggers(access_log=True)
    assert access.handlers == [] and access.propagate and access.level == logging.INFO
    record = access.makeRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("c:1", "GET", "/x", "1.1", 200),
        None,
    )
    assert access.filter(record)
    fields = record.__dict__
    assert (fields["method"], fields["path"], fields["status"]) == ("GET", "/x", 200)
    adopt_uvicorn_loggers(access_log=False)
    assert access.level == logging.WARNING


def _entities(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*entities_command(), *args], cwd=REPO, env=cli_env(), capture_output=True, text=True
    )


def test_verbose_run_does_not_flood(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'v.db'}"
    quiet = _entities("-vv", "run", COUNTER, "/counter/c1", '{"add": 1}', "--json", "--db", db)
    assert quiet.returncode == 0 and quiet.stdout == "1\n", quiet.stderr
    assert "aiosqlite" not in quiet.stderr and "asyncio" not in quiet.stderr, quiet.stderr
    loud = _entities("-vvv", "run", COUNTER, "/counter/c1", '{"add": 1}', "--json", "--db", db)
    assert loud.returncode == 0 and "DEBUG aiosqlite" in loud.stderr


def test_serve_logs_json_with_an_access_log(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    process = EntitiesProcess(
        [
            *("--log-format", "json", "serve", "examples.all:registry", "--access-log"),
            *("--db", f"sqlite:///{tmp_path / 's.db'}", "--port", str(port)),
        ],
        log=log,
        port=port,
    )
    process.start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx2.get(f"{url}/_entities/types", timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        while "uvicorn.access" not in process.output() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.stop()
    lines = [orjson.loads(line) for line in process.output().splitlines()]  # JSON, every one
    banner = next(line for line in lines if line["logger"] == "entities.cli")
    assert banner["url"] == url and banner["console"] == f"{url}/ui/"
    assert "counter" in banner["types"]
    access = next(line for line in lines if line["logger"] == "uvicorn.access")
    assert (access["method"], access["path"], access["status"]) == ("GET", "/_entities/types", 200)
    assert access["level"] == "INFO" and access["time"].endswith("Z")


def test_serve_without_an_access_log_logs_no_requests(tmp_path: Path) -> None:
    port = free_port()
    args = ["serve", "examples.all:registry", "--db", f"sqlite:///{tmp_path / 's.db'}"]
    process = EntitiesProcess([*args, "--port", str(port)], log=tmp_path / "s.log", port=port)
    process.start()
    try:
        assert httpx2.get(f"http://127.0.0.1:{port}/_entities/types").status_code == 200
        time.sleep(0.3)
    finally:
        process.stop()
    output = process.output()
    assert f"  console: http://127.0.0.1:{port}/ui/" in output
    assert "GET /_entities/types" not in output
