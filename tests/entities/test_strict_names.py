"""Entity types and ids are matched in full: a trailing newline (``%0A``) names nothing.

Before, the segment pattern ended in ``$``, which also matches before a final newline, so
``/counter/victim%0A`` was accepted and its tag landed on ``/counter/victim``'s listing.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from entities import InvalidEntityURL, Runtime, parse_url
from entities._urls import check_segment
from entities.server import create_app
from examples import all as examples_all
from streams import BadOffset, parse_offset
from tests._live import serving


@pytest.mark.parametrize(
    "url",
    ["/counter/victim\n", "/counter\n/victim", "/counter/victim\r", "/counter/vic\ntim", "/a/\n"],
)
def test_parse_url_refuses_a_newline_anywhere(url: str) -> None:
    with pytest.raises(InvalidEntityURL):
        parse_url(url)


@pytest.mark.parametrize("value", ["victim\n", "\nvictim", "x" * 129, "", "-x", "a b", "é"])
def test_check_segment_matches_in_full(value: str) -> None:
    with pytest.raises(InvalidEntityURL):
        check_segment(value, "id")


def test_documented_character_set_and_length_pass() -> None:
    assert check_segment("A" + "z9._~-" * 21 + "x", "id")  # 128 characters
    assert parse_url("/counter/c.1_~-x").id == "c.1_~-x"


def test_offsets_are_matched_in_full() -> None:
    with pytest.raises(BadOffset):
        parse_offset("0000000000000000_0000000000000001\n")


async def test_a_newline_id_over_http_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'e.db'}"
    async with Runtime(examples_all.registry, db) as runtime:
        async with serving(create_app(runtime)) as base, httpx2.AsyncClient(base_url=base) as http:
            created = await http.put("/_entities/entities/counter/victim", json={})
            assert created.status_code == 201, created.text
            before = (await http.get("/_entities/entities")).json()
            for method, path, body in [
                ("PUT", "/_entities/entities/counter/victim%0A", {}),
                ("PUT", "/_entities/entities/counter/victim%0A/tags/owner", {"value": "evil"}),
                ("POST", "/_entities/entities/counter/victim%0A/send", {"payload": {"add": 1}}),
                ("PUT", "/_entities/entities/counter%0A/victim", {}),
            ]:
                answer = await http.request(method, path, json=body)
                assert 400 <= answer.status_code < 500, (path, answer.text)
                assert set(answer.json()) == {"error"}
            assert (await http.get("/_entities/entities")).json() == before
            victim = (await http.get("/_entities/entities/counter/victim")).json()
            assert victim["tags"] == {}
