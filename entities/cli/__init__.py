"""The ``entities`` command line (``entities --help``)."""

from __future__ import annotations

from ._main import cli as cli
from ._main import main as main

__all__ = ["cli", "main"]
