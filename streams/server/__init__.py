"""The Durable Streams HTTP protocol over any :class:`streams.Store`, as an ASGI app.

``create_app(store, settings=...)`` returns the app (serve it with uvicorn); ``serve(db)`` opens
a store by URL and serves it until interrupted; ``python -m streams serve`` does the same from a
shell. Streams live at ``/v1/stream/{path}``: ``PUT`` creates (or forks), ``POST`` appends or
closes, ``DELETE`` deletes, ``HEAD`` describes, ``GET`` reads (``live=long-poll`` or ``live=sse``
to follow the tail).
"""

from __future__ import annotations

from ._app import StreamsApp as StreamsApp
from ._app import create_app as create_app
from ._serve import serve as serve
from ._serve import serve_app as serve_app
from ._settings import ServerSettings as ServerSettings

__all__ = ["ServerSettings", "StreamsApp", "create_app", "serve", "serve_app"]
