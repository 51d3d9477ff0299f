"""``entities check APP --db URL`` through the real console script, on SQLite and PostgreSQL:
exit 0 and one OK line for compatible code, exit 1 and one line per finding otherwise; a
mistake in the command line is one line on stderr, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson

from ._support import REPO, cli_env, entities_command

OLD = """
from pydantic import BaseModel
from entities import HandlerContext, Registry, WakeEvent, collection

class Total(BaseModel):
    key: str
    value: int = 0{extra_field}

class Add(BaseModel):
    add: int

registry = Registry()

@registry.define("counter", state={{"totals": collection(Total)}}, inbox=Add)
async def counter(ctx: HandlerContext, wake: WakeEvent) -> None:
    for m in wake.messages:
        row = ctx.state.totals.get("total")
        value = (row.value if row else 0) + m.payload["add"]{twice}
        fresh = {{"key": "total"}}
        ctx.state.totals.upsert({{**(row.model_dump() if row else fresh), "value": value}})
        ctx.reply(value)
{more}"""

GREETER = """
@registry.define("greeter")
async def greeter(ctx: HandlerContext, wake: WakeEvent) -> None:
    return None
"""


def _app(tmp_path: Path, name: str, extra_field: str = "", twice: str = "", more: str = "") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(OLD.format(extra_field=extra_field, twice=twice, more=more))
    return f"{path}:registry"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*entities_command(), *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def test_check_cli_findings_and_exit_codes(shared_store_url: str, tmp_path: Path) -> None:
    db = shared_store_url
    old = _app(tmp_path, "old")
    for n in (2, 3):
        sent = _run("run", old, "/counter/c1", f'{{"add": {n}}}', "--json", "--db", db)
        assert sent.returncode == 0, sent.stderr

    same = _run("check", old, "--db", db)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.splitlines() == [
        "ok: 1 live entity, 1 state row, 0 queued messages, 2 wakes replayed; "
        "nothing stops this deploy"
    ]

    compatible = _app(
        tmp_path, "compatible", extra_field='\n    unit: str = "apples"', more=GREETER
    )
    result = _run("check", compatible, "--db", db)
    assert result.returncode == 0, result.stdout + result.stderr

    breaking = _app(tmp_path, "breaking", extra_field="\n    unit: str")
    result = _run("check", breaking, "--db", db, "--replay-last", "0")
    assert result.returncode == 1, result
    assert result.stdout.splitlines() == [
        "/counter/c1 state 'totals' row 'total': field 'unit' does not fit Total: Field required",
        "1 finding: 1 live entity, 1 state row, 0 queued messages, 0 wakes replayed",
    ]

    changed = _app(tmp_path, "changed", twice=" * 2")
    result = _run("check", changed, "--db", db, "-o", "json")
    assert result.returncode == 1, result
    report = orjson.loads(result.stdout)
    assert report["ok"] is False and report["wakes"] == 2
    assert {f["kind"] for f in report["findings"]} == {"divergence"}
    assert all(f["urls"] == ["/counter/c1"] for f in report["findings"])

    removed = tmp_path / "removed.py"
    removed.write_text("from entities import Registry\nregistry = Registry()\n")
    result = _run("check", f"{removed}:registry", "--db", db)
    assert result.returncode == 1, result
    assert result.stdout.splitlines()[0] == (
        "type 'counter' is not in the new code but has 1 live entity: /counter/c1"
    )


def test_check_cli_mistakes_are_one_line(tmp_path: Path) -> None:
    old = _app(tmp_path, "old")
    db = f"sqlite:///{tmp_path}/c.db"
    assert _run("run", old, "/counter/c1", '{"add": 1}', "--json", "--db", db).returncode == 0

    _one_line(
        _run("check", "nowhere_at_all:registry", "--db", db),
        2,
        "error: APP 'nowhere_at_all:registry': cannot import 'nowhere_at_all'",
    )
    _one_line(_run("check", "no-colon", "--db", db), 2, "expected module:attr")
    _one_line(_run("check", f"{tmp_path}/absent.py:registry", "--db", db), 2, "no such file")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    _one_line(_run("check", f"{broken}:registry", "--db", db), 2, "RuntimeError: boom at import")
    _one_line(_run("check", old, "--db", "demo.db"), 2, "is not a store URL")
    missing = tmp_path / "nowhere" / "x.db"
    _one_line(_run("check", old, "--db", f"sqlite:///{missing}"), 2, f"no database at {missing}")
    assert not missing.parent.exists()  # check only reads: nothing is created
    _one_line(
        _run("check", old, "--db", "postgresql://postgres@127.0.0.1:1/none"),
        1,
        "cannot reach PostgreSQL at 127.0.0.1:1",
    )
    negative = _run("check", old, "--db", db, "--replay-last", "-1")
    assert negative.returncode == 2 and "Traceback" not in negative.stderr
