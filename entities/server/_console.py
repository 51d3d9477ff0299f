"""The console: static pages under ``/ui/`` (no build step, no network at run time).

``GET /`` redirects to ``/ui/``. Every page (``/ui/``, ``/ui/workers``, ``/ui/{type}/{id}``) is
the same ``index.html``; the browser routes on the path with the history API and reads
everything else from the control plane (``/_entities``) and the entity streams
(``/v1/stream``), like any client, so the pages hold no data and need no token to load.
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

__all__ = ["CONSOLE_PREFIX", "console_routes", "is_console_path"]

CONSOLE_PREFIX = "/ui"
STATIC_DIR = Path(__file__).with_name("console")
_NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a new version's assets apply at once


def is_console_path(path: str) -> bool:
    """Whether ``path`` is a console page or asset (or ``/``): static, served without a token."""
    return path in ("/", CONSOLE_PREFIX) or path.startswith(CONSOLE_PREFIX + "/")


async def _to_console(request: Request) -> Response:
    return RedirectResponse(CONSOLE_PREFIX + "/", status_code=307)


async def _index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers=_NO_CACHE)


class _Assets(StaticFiles):
    """The console's scripts and styles, revalidated on every load."""

    def file_response(
        self,
        full_path: PathLike[str] | str,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_NO_CACHE)
        return response


def console_routes() -> list[BaseRoute]:
    """The console's routes: the redirect from ``/``, its assets and its pages."""
    return [
        Route("/", _to_console, methods=["GET"]),
        Route(CONSOLE_PREFIX, _to_console, methods=["GET"]),
        Mount(CONSOLE_PREFIX + "/assets", app=_Assets(directory=STATIC_DIR)),
        Route(CONSOLE_PREFIX + "/{page:path}", _index, methods=["GET"]),
    ]
