"""A durable entity runtime over event streams (see DESIGN.md)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__: list[str] = []
