"""Principals and grants (``entities serve --auth``), cross-site rules and the ``Host`` check,
against a real uvicorn: every control-plane route with a principal that may and one that may
not, the stream reads, the metrics, the 401/403 answers, senders, CORS and DNS rebinding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from click.testing import CliRunner

from entities import Runtime
from entities.cli import cli
from entities.server import (
    AuthConfig,
    AuthFileError,
    ServeOptions,
    create_app,
    load_auth,
)
from entities.server._app import host_names
from entities.server._auth import glob_regex
from examples import all as examples_all
from tests._live import serving
from tests.entities._support import EntitiesProcess, free_port

ALICE, BOB, ROOT, KILLER, MALLORY, SCOPED = (
    "alice-t0ken",
    "bob-t0ken",
    "root-t0ken",
    "killer-t0ken",
    "mallory-t0ken",
    "scoped-t0ken",
)
LISTED = "https://app.example"
EVIL = "https://evil.example"

AUTH: dict[str, Any] = {
    "principals": {
        "alice": {
            "token": ALICE,
            "grants": [{"actions": ["spawn", "send", "read"], "urls": "/counter/*"}],
        },
        "bob": {  # given as its SHA-256
            "token": "sha256:" + hashlib.sha256(BOB.encode()).hexdigest(),
            "grants": [{"actions": ["read"], "urls": "/counter/a*"}],
        },
        "root": {"token": ROOT, "grants": [{"actions": ["admin"], "urls": "*"}]},
        "killer": {"token": KILLER, "grants": [{"actions": ["kill"], "urls": "/counter/*"}]},
        "mallory": {"token": MALLORY, "grants": [{"actions": ["read"], "urls": "/square/*"}]},
        "scoped": {"token": SCOPED, "grants": [{"actions": ["admin"], "urls": "/counter/*"}]},
    }
}


@dataclass
class Served:
    base: str
    runtime: Runtime

    def client(self, token: str | None = None, **headers: str) -> httpx2.AsyncClient:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx2.AsyncClient(base_url=self.base, headers=headers, timeout=10)

    async def inbox(self, url: str) -> list[Any]:
        events, _ = await self.runtime.read(url, limit=10_000)
        return [e["value"] for e in events if e["type"] == "inbox"]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with Runtime(examples_all.registry, "memory://") as runtime:
        for url in ("/counter/a1", "/counter/b1", "/counter/k1"):
            await runtime.spawn(url)
        await runtime.spawn("/square/s1", args={"x": 2})
        app = create_app(runtime, auth=AuthConfig.model_validate(AUTH), cors_origins=[LISTED])
        async with serving(app) as base:
            yield Served(base, runtime)


def error_of(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    error: dict[str, Any] = body["error"]
    return error


ENTITY = "/_entities/entities/counter/a1"
# (method, path, json body, allowed token, denied token, the action the denied one lacks)
MATRIX: list[tuple[str, str, Any, str, str, str]] = [
    ("PUT", "/_entities/entities/counter/new", {}, ALICE, BOB, "spawn"),
    ("GET", ENTITY, None, BOB, MALLORY, "read"),
    ("HEAD", ENTITY, None, BOB, MALLORY, "read"),
    ("DELETE", "/_entities/entities/counter/k1", None, KILLER, ALICE, "kill"),
    ("POST", ENTITY + "/send", {"payload": {"add": 1}}, ALICE, BOB, "send"),
    ("POST", ENTITY + "/tags/colour", {"value": "blue"}, SCOPED, ALICE, "admin"),
    ("PUT", ENTITY + "/tags/colour", {"value": "red"}, ROOT, ALICE, "admin"),
    ("DELETE", ENTITY + "/tags/colour", None, SCOPED, ALICE, "admin"),
    ("GET", ENTITY + "/schedules", None, BOB, MALLORY, "read"),
    ("PUT", ENTITY + "/schedules/daily", {"expression": "0 9 * * *"}, ALICE, BOB, "send"),
    ("DELETE", ENTITY + "/schedules/daily", None, ALICE, BOB, "send"),
    ("GET", ENTITY + "/replies/some-key", None, BOB, MALLORY, "read"),
    ("GET", "/_entities/types", None, ROOT, SCOPED, "admin"),
    ("GET", "/_entities/workers", None, ROOT, ALICE, "admin"),
    ("GET", "/_entities/dead-letters", None, ROOT, SCOPED, "admin"),
    ("POST", "/_entities/dead-letters/nope/retry", None, ROOT, ALICE, "admin"),
    ("DELETE", "/_entities/dead-letters/nope", None, ROOT, ALICE, "admin"),
    ("GET", "/v1/stream/counter/a1/main?offset=-1", None, BOB, MALLORY, "read"),
    ("HEAD", "/v1/stream/counter/a1/main", None, BOB, MALLORY, "read"),
    ("GET", "/metrics", None, ROOT, SCOPED, "admin"),
]


async def test_grants_matrix(served: Served) -> None:
    """Each route, in order (the allowed request may change what the next one sees): the
    denied principal gets 403 naming the action and changes nothing, the allowed one passes,
    and no token at all gets 401."""
    for method, path, body, allowed, denied, action in MATRIX:
        case = (method, path)
        async with served.client() as anonymous:
            none = await anonymous.request(method, path, json=body)
        assert none.status_code == 401, case
        assert none.headers["www-authenticate"].startswith("Bearer"), case
        if method != "HEAD":
            assert error_of(none)["code"] == "UNAUTHORIZED", case
        before = await served.runtime.list_entities()
        async with served.client(denied) as client:
            refused = await client.request(method, path, json=body)
        assert refused.status_code == 403, (case, refused.text)
        if method != "HEAD":
            error = error_of(refused)
            assert error["code"] == "FORBIDDEN", case
            assert repr(action) in error["message"], (case, error)
            assert error["details"]["action"] == action, case
        assert await served.runtime.list_entities() == before, case
        async with served.client(allowed) as client:
            answer = await client.request(method, path, json=body)
        assert answer.status_code not in (401, 403), (case, answer.text)
        assert answer.status_code < 500, (case, answer.text)
        if path.startswith("/_entities/dead-letters/"):
            assert error_of(answer)["code"] == "DEAD_LETTER_NOT_FOUND"
        else:
            assert answer.status_code < 300, (case, answer.text)


async def test_fork_needs_spawn_on_the_source_and_on_the_new_url(served: Served) -> None:
    await served.runtime.run_until_idle()
    fork = "/_entities/entities/counter/a1/fork"
    async with served.client(BOB) as bob:  # read only
        refused = await bob.post(fork, json={"id": "a2"})
    assert refused.status_code == 403 and error_of(refused)["details"]["action"] == "spawn"
    async with served.client(ALICE) as alice:
        made = await alice.post(fork, json={"id": "a2"})
    assert made.status_code == 201, made.text
    async with served.client(SCOPED) as scoped:  # admin on /counter/*: spawn there too
        made = await scoped.post(fork, json={"id": "a3"})
        assert made.status_code == 201, made.text
    grants = [{"actions": ["spawn"], "urls": "/counter/a*"}]
    auth = AuthConfig.model_validate({"principals": {"p": {"token": "p-t0ken", "grants": grants}}})
    app = create_app(served.runtime, auth=auth)
    async with (
        serving(app) as base,
        httpx2.AsyncClient(base_url=base, headers={"Authorization": "Bearer p-t0ken"}) as client,
    ):
        outside = await client.post(fork, json={"id": "zz"})
        assert outside.status_code == 403 and "/counter/zz" in error_of(outside)["message"]
        inside = await client.post(fork, json={"id": "a4"})
        assert inside.status_code == 201, inside.text
    assert await served.runtime.lookup("/counter/zz") is None


async def test_listing_shows_what_the_principal_may_read(served: Served) -> None:
    expected = {
        ALICE: ["/counter/a1", "/counter/b1", "/counter/k1"],
        BOB: ["/counter/a1"],
        MALLORY: ["/square/s1"],
        ROOT: ["/counter/a1", "/counter/b1", "/counter/k1", "/square/s1"],
        KILLER: [],
    }
    for token, urls in expected.items():
        async with served.client(token) as client:
            listing = await client.get("/_entities/entities")
        assert listing.status_code == 200
        assert sorted(e["url"] for e in listing.json()) == urls, token


async def test_401_shapes_and_the_scheme_in_any_case(served: Served) -> None:
    async with served.client() as client:
        for header in ("", "Bearer", "Bearer wrong", ALICE, f"Basic {ALICE}", f"Token {ALICE}"):
            answer = await client.get(ENTITY, headers={"Authorization": header} if header else {})
            assert answer.status_code == 401, header
            assert answer.headers["www-authenticate"].startswith("Bearer"), header
            assert answer.headers["content-type"] == "application/json"
            assert error_of(answer)["code"] == "UNAUTHORIZED"
        for scheme in ("bearer", "BEARER", "BeArEr"):
            answer = await client.get(ENTITY, headers={"Authorization": f"{scheme} {ALICE}"})
            assert answer.status_code == 200, scheme
        # a hashed token is matched from the token itself, never from its hash
        hashed = AUTH["principals"]["bob"]["token"]
        assert (
            await client.get(ENTITY, headers={"Authorization": f"Bearer {hashed}"})
        ).status_code == 401
        assert (
            await client.get(ENTITY, headers={"Authorization": f"Bearer {BOB}"})
        ).status_code == 200


async def test_public_paths_need_no_token(served: Served) -> None:
    async with served.client() as client:
        for path in ("/healthz", "/readyz", "/ui/", "/ui/counter/a1", "/ui/assets/app.js"):
            answer = await client.get(path)
            assert answer.status_code == 200, (path, answer.text)
        assert (await client.get("/")).status_code == 307
        assert (await client.get("/nowhere")).status_code == 401


async def test_sender_is_the_principal(served: Served) -> None:
    send = ENTITY + "/send"
    async with served.client(ALICE) as alice, served.client(ROOT) as root:
        assert (await alice.post(send, json={"payload": {"add": 1}})).status_code == 202
        same = await alice.post(send, json={"payload": {"add": 2}, "from": "principal:alice"})
        assert same.status_code == 202
        other = await alice.post(send, json={"payload": {"add": 3}, "from": "user:bob"})
        assert other.status_code == 403
        assert error_of(other)["code"] == "FORBIDDEN_SENDER"
        assert "'admin'" in error_of(other)["message"]
        forged = await alice.post(send, json={"payload": {"add": 4}, "from": "principal:root"})
        assert forged.status_code == 403
        assert (
            await root.post(send, json={"payload": {"add": 5}, "from": "user:bob"})
        ).status_code == 202
        assert (await root.post(send, json={"payload": {"add": 6}})).status_code == 202
        entity = await root.post(send, json={"payload": {"add": 7}, "from": "/counter/b1"})
        assert entity.status_code == 422 and error_of(entity)["code"] == "INVALID_SENDER"
    senders = [(m["payload"]["add"], m["from"]) for m in await served.inbox("/counter/a1")]
    assert senders == [
        (1, "principal:alice"),
        (2, "principal:alice"),
        (5, "user:bob"),
        (6, "principal:root"),
    ]


async def test_spawn_naming_a_parent_is_422_for_everyone(served: Served) -> None:
    async with served.client(ROOT) as root:
        answer = await root.put("/_entities/entities/counter/child", json={"parent": "/counter/a1"})
    assert answer.status_code == 422
    assert error_of(answer)["code"] == "INVALID_PARENT"
    assert await served.runtime.lookup("/counter/child") is None


async def test_cors_on_the_control_plane(served: Served) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    async with served.client() as client:
        for origin in (EVIL, "null", "http://127.0.0.1:1"):
            answer = await client.options(ENTITY + "/send", headers={**preflight, "Origin": origin})
            assert answer.status_code == 403, origin
            assert "access-control-allow-origin" not in answer.headers
        answer = await client.options(ENTITY + "/send", headers={**preflight, "Origin": LISTED})
        assert answer.status_code == 204
        assert answer.headers["access-control-allow-origin"] == LISTED
        assert "Authorization" in answer.headers["access-control-allow-headers"]
        assert "POST" in answer.headers["access-control-allow-methods"]
        # no token from a listed origin: a 401 the page can read
        refused = await client.get(ENTITY, headers={"Origin": LISTED})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == LISTED
        assert "WWW-Authenticate" in refused.headers["access-control-expose-headers"]
    # a simple (not preflighted) cross-origin POST never reaches the route, token or not
    simple = {"Content-Type": "text/plain"}
    body = b'{"payload": {"add": 100}}'
    async with served.client(ALICE) as alice:
        for headers in ({"Origin": EVIL}, {"Origin": EVIL, "Authorization": ""}):
            answer = await alice.post(ENTITY + "/send", content=body, headers={**simple, **headers})
            assert answer.status_code == 403
            assert error_of(answer)["code"] == "FORBIDDEN_ORIGIN"
        assert await served.inbox("/counter/a1") == []
        listed = await alice.post(
            ENTITY + "/send", content=body, headers={**simple, "Origin": LISTED}
        )
        assert listed.status_code == 202
        assert listed.headers["access-control-allow-origin"] == LISTED
        same = await alice.post(
            ENTITY + "/send", content=body, headers={**simple, "Origin": served.base}
        )
        assert same.status_code == 202  # the console's own origin
        assert "access-control-allow-origin" not in same.headers
        metrics = await alice.get("/metrics", headers={"Origin": EVIL})
        assert metrics.status_code == 403
    assert len(await served.inbox("/counter/a1")) == 2


async def test_stream_reads_keep_the_protocol_cors(served: Served) -> None:
    path = "/v1/stream/counter/a1/main"
    async with served.client() as client:
        preflight = await client.options(
            path, headers={"Origin": EVIL, "Access-Control-Request-Method": "GET"}
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "*"
        refused = await client.get(path, params={"offset": "-1"}, headers={"Origin": EVIL})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == "*"
        read = await client.get(
            path,
            params={"offset": "-1"},
            headers={"Origin": EVIL, "Authorization": f"Bearer {BOB}"},
        )
        assert read.status_code == 200
        assert read.headers["access-control-allow-origin"] == "*"


HOST_CASES = [
    ("evil.example", 421),
    ("evil.example:4437", 421),
    ("localhost.evil.example", 421),
    ("localhost", 200),
    ("localhost:4437", 200),
    ("127.0.0.1", 200),
    ("127.0.0.1:80", 200),
    ("[::1]", 200),
    ("[::1]:4437", 200),
    ("LOCALHOST:1", 200),
]


async def test_host_check_on_loopback_binds() -> None:
    assert host_names(ServeOptions(host="0.0.0.0")) is None
    assert host_names(ServeOptions(host="::1")) == ("localhost", "127.0.0.1", "::1")
    names = host_names(ServeOptions(host="127.0.0.1", allowed_hosts=("box.internal",)))
    async with Runtime(examples_all.registry, "memory://") as runtime:
        app = create_app(runtime, token=ROOT, allowed_hosts=names)
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as client:
            for host, status in [*HOST_CASES, ("box.internal:8080", 200)]:
                answer = await client.get("/healthz", headers={"Host": host})
                assert answer.status_code == status, host
                if status == 421:
                    error = error_of(answer)
                    assert error["code"] == "MISDIRECTED_HOST"
                    assert "--allowed-host" in error["message"]


def test_entities_serve_with_auth_cors_and_allowed_host(tmp_path: Path) -> None:
    """``entities serve --auth FILE --cors-origin O --allowed-host H`` end to end: a loopback
    bind checks ``Host``, grants apply, the listed origin gets its CORS headers."""
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps(AUTH))
    port = free_port()
    process = EntitiesProcess(
        [
            *("serve", "examples.all:registry", "--db", f"sqlite:///{tmp_path / 'a.db'}"),
            *("--port", str(port), "--auth", str(auth_file), "--cors-origin", LISTED),
            *("--allowed-host", "box.internal"),
        ],
        log=tmp_path / "serve.log",
        port=port,
    )
    process.start()
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/healthz", headers={"Host": "evil.example"}).status_code == 421
            assert client.get("/healthz", headers={"Host": "box.internal:80"}).status_code == 200
            assert client.get("/healthz", headers={"Host": f"localhost:{port}"}).status_code == 200
            alice = {"Authorization": f"bearer {ALICE}"}
            spawned = client.put("/_entities/entities/counter/z", json={}, headers=alice)
            assert spawned.status_code == 201
            bob = {"Authorization": f"Bearer {BOB}"}
            denied = client.put("/_entities/entities/counter/y", json={}, headers=bob)
            assert denied.status_code == 403 and "'spawn'" in error_of(denied)["message"]
            assert client.get("/_entities/types").status_code == 401
            cors = client.options(
                "/_entities/types",
                headers={"Origin": LISTED, "Access-Control-Request-Method": "GET"},
            )
            assert cors.headers["access-control-allow-origin"] == LISTED
    finally:
        process.stop()


# -- the auth file ------------------------------------------------------------------------------


def test_glob_star_stays_in_one_segment() -> None:
    def match(pattern: str, url: str) -> bool:
        return glob_regex(pattern).fullmatch(url) is not None

    assert match("/counter/*", "/counter/a1")
    assert not match("/counter/*", "/counterx/a1")
    assert not match("/*", "/counter/a1")
    assert match("/*/a1", "/counter/a1")
    assert match("/**", "/counter/a1")
    assert match("*", "/counter/a1")
    assert match("/counter/a?", "/counter/a1") and not match("/counter/a?", "/counter/a12")
    assert match("/counter/[ab]1", "/counter/b1") and not match("/counter/[!ab]1", "/counter/b1")
    assert match("/count.r/*", "/count.r/x") and not match("/count.r/*", "/countxr/x")


def test_load_auth_json_and_toml(tmp_path: Path) -> None:
    as_json = tmp_path / "auth.json"
    as_json.write_text(json.dumps(AUTH))
    config = load_auth(as_json)
    assert sorted(config.principals) == sorted(AUTH["principals"])
    alice = config.principals["alice"]
    assert alice.name == "alice" and alice.sender == "principal:alice"
    assert config.authenticate(ALICE) == alice
    assert config.authenticate(BOB) == config.principals["bob"]
    assert config.authenticate("nobody") is None
    assert alice.allows("send", "/counter/x") and not alice.allows("kill", "/counter/x")
    assert not alice.allows("read", "/square/x") and not alice.allows("read", None)
    assert config.principals["root"].allows("signal", None)
    assert not config.principals["scoped"].allows("admin", None)
    assert ALICE not in repr(alice)
    as_toml = tmp_path / "auth.toml"
    as_toml.write_text(
        '[principals.ops]\ntoken = "ops-t0ken"\n'
        '[[principals.ops.grants]]\nactions = ["read", "approve"]\nurls = "/assistant/*"\n'
    )
    ops = load_auth(as_toml).principals["ops"]
    assert ops.allows("approve", "/assistant/a1") and not ops.allows("send", "/assistant/a1")


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"principals": {"a": {"grants": []}}}, "principals.a.token: Field required"),
        (
            {"principals": {"a": {"token": "t", "grants": [{"actions": ["fly"], "urls": "*"}]}}},
            "principals.a.grants.0.actions.0",
        ),
        (
            {
                "principals": {
                    "a": {"token": "t", "grants": [{"actions": ["read"], "urls": "counter"}]}
                }
            },
            "principals.a.grants.0.urls",
        ),
        (
            {"principals": {"a": {"token": "t", "grants": [{"actions": [], "urls": "*"}]}}},
            "principals.a.grants.0.actions",
        ),
        ({"principals": {"a": {"token": "sha256:abc"}}}, "principals.a.token: a token hash"),
        (
            {"principals": {"a": {"token": "t"}, "b": {"token": "t"}}},
            "principals.b.token: the same token as principals.a",
        ),
        ({"principals": {"a b": {"token": "t"}}}, "principals.a b: a name"),
        ({"principals": {}}, "principals: at least one"),
        ({"users": {}}, "principals: Field required"),
    ],
)
def test_bad_auth_files_name_the_field(tmp_path: Path, data: Any, says: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AuthFileError) as caught:
        load_auth(path)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_serve_refuses_a_bad_auth_file_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "auth.json"
    bad.write_text('{"principals": {"a": {"token": ""}}}')
    result = runner.invoke(cli, ["serve", "examples.all:registry", "--auth", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: --auth ")
    assert "principals.a.token" in result.output and len(result.output.strip().splitlines()) == 1
    missing = runner.invoke(cli, ["serve", "examples.all:registry", "--auth", "/no/such.json"])
    assert missing.exit_code == 2 and "cannot read it" in missing.output
    good = tmp_path / "good.json"
    good.write_text(json.dumps(AUTH))
    both = runner.invoke(
        cli, ["serve", "examples.all:registry", "--auth", str(good), "--token", "x"]
    )
    assert both.exit_code == 2 and "--auth and --token" in both.output
