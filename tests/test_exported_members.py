"""Every package's ``__all__`` is the exact list of its public names, and sorted."""

from __future__ import annotations
import __future__

import importlib
import types

import pytest


@pytest.mark.parametrize(
    "name",
    ["streams", "streams.server", "entities", "entities.agent", "entities.server", "entities.cli"],
)
def test_all_lists_public_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    public = sorted(
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and not isinstance(value, types.ModuleType | __future__._Feature)
    )
    assert sorted(exported) == public
    assert len(exported) == len(set(exported))  # ordering is ruff RUF022's job


def test_exported_names_resolve() -> None:
    import streams

    for attr in streams.__all__:
        assert getattr(streams, attr) is not None
