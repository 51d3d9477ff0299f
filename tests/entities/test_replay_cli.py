"""``entities replay`` through the real console script: 0 when wakes replay identically, 1 with
a precise report when one diverges."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ._support import REPO, cli_env, entities_command

APP = """
import random
from pydantic import BaseModel
from entities import HandlerContext, Registry, WakeEvent, collection

class Row(BaseModel):
    key: str
    value: float

registry = Registry()

@registry.define("dice", state={"rolls": collection(Row)})
async def dice(ctx: HandlerContext, wake: WakeEvent) -> None:
    for m in wake.messages:
        if m.payload.get("fair"):
            value = await ctx.step("roll", lambda: random.random())  # journaled
        else:
            value = random.random()  # not journaled: replay will differ
        ctx.state.rolls.upsert(Row(key="last", value=value))
        ctx.reply(value)
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*entities_command(), *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_replay_cli_exit_codes_and_report(tmp_path: Path) -> None:
    app = tmp_path / "dice.py"
    app.write_text(APP)
    db = f"sqlite:///{tmp_path}/dice.db"
    first = _run("run", f"{app}:registry", "/dice/d1", '{"fair": true}', "--json", "--db", db)
    assert first.returncode == 0, first.stderr
    ok = _run("replay", "/dice/d1", "--db", db)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 wakes replayed, no divergence" in ok.stdout
    second = _run("run", f"{app}:registry", "/dice/d1", '{"fair": false}', "--json", "--db", db)
    assert second.returncode == 0, second.stderr
    bad = _run("replay", "/dice/d1", "--db", db)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "wake 1" in bad.stdout and "wake 2" in bad.stdout and "DIVERGED" in bad.stdout
    assert "state:rolls/last" in bad.stdout
    only_first = _run("replay", "/dice/d1", "--db", db, "--wake", "1", "-o", "json")
    assert only_first.returncode == 0 and '"ok":true' in only_first.stdout
    missing = _run("replay", "/dice/d1", "--db", db, "--wake", "9")
    assert missing.returncode != 0 and "no recorded wake" in missing.stderr


def test_replay_reads_only(tmp_path: Path) -> None:
    """A database that is not there is an error, never created (nor its folder)."""
    missing = tmp_path / "nowhere" / "x.db"
    result = _run("replay", "/dice/d1", "--db", f"sqlite:///{missing}", "--app", "x.py:registry")
    assert result.returncode == 2, result
    assert result.stderr.strip() == f"error: no database at {missing} (--db sqlite:///{missing})"
    assert not (tmp_path / "nowhere").exists()
    bad_url = _run("replay", "/dice/d1", "--db", "dice.db")
    assert bad_url.returncode == 2 and "is not a store URL" in bad_url.stderr, bad_url
    assert "Traceback" not in bad_url.stderr
