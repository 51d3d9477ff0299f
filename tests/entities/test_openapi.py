"""The control plane's OpenAPI document: it covers every route, and a bounded schemathesis run
against a real ``entities serve`` finds no server error and no answer the document does not
describe."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from starlette.routing import Route

from entities import Registry, Runtime
from entities.server._openapi import openapi_document
from entities.server._routes import control_routes
from tests.entities._support import EntitiesProcess, cli_env, free_port


async def test_the_document_covers_every_control_plane_route_and_method() -> None:
    document = openapi_document()
    async with Runtime(Registry(), "memory://") as rt:
        routes = [r for r in control_routes(rt) if isinstance(r, Route)]
    assert routes
    for route in routes:
        documented = document["paths"].get(route.path)
        assert documented is not None, route.path
        for method in route.methods or ():
            if method == "HEAD" and "get" in documented:
                continue  # Starlette answers HEAD for every GET route
            assert method.lower() in documented, (route.path, method)
    for path, item in document["paths"].items():
        for name in ("SpawnBody", "SendBody", "CronBody", "TagBody"):
            assert name in document["components"]["schemas"]
        assert path.startswith(("/_entities/", "/healthz", "/readyz")), path
        assert all("responses" in op for key, op in item.items() if key != "parameters")


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(tmp_path: Path) -> None:
    port = free_port()
    server = EntitiesProcess(
        ["serve", "examples.all:registry", "--db", f"sqlite:///{tmp_path}/st.db",
         "--port", str(port)],
        log=tmp_path / "serve.log",
        port=port,
    )  # fmt: skip
    server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx2.get(f"{base}/openapi.json").json()["openapi"] == "3.1.0"
        command = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
        assert command is not None, "schemathesis is in the dev extra"
        run = subprocess.run(
            [
                command, "run", f"{base}/openapi.json", "--url", base,
                "--checks", "not_a_server_error,status_code_conformance,"
                "content_type_conformance,response_schema_conformance",
                "--max-examples", "12", "--seed", "1", "--request-timeout", "10",
                "--phases", "examples,coverage,fuzzing",
            ],
            capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=300,
        )  # fmt: skip
    finally:
        server.stop()
    report = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "Traceback" not in server.output(), server.output()[-3000:]


pytestmark = pytest.mark.timeout(400)
