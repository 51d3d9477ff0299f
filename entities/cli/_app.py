"""Loading ``APP`` arguments: ``module:attr`` or ``path/to/file.py:attr``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import click

from .._registry import Registry

__all__ = ["load_registry"]


def load_registry(spec: str) -> Registry:
    """Import the registry named by ``spec``.

    Raises:
        click.BadParameter: the module, file or attribute cannot be found, or is no Registry.
    """
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise click.BadParameter(f"expected module:attr or path/to/file.py:attr, got {spec!r}")
    if target.endswith(".py") or "/" in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise click.BadParameter(f"no such file {target!r}")
        name = f"_entities_app_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise click.BadParameter(f"cannot import {target!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise click.BadParameter(f"cannot import {target!r}: {exc}") from None
    registry = getattr(module, attr, None)
    if not isinstance(registry, Registry):
        raise click.BadParameter(f"{spec!r} is not an entities.Registry")
    if target.endswith(".py") or "/" in target:
        registry.source = f"{Path(target).resolve()}:{attr}"
    else:
        registry.source = spec
    return registry
