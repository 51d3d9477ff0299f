"""The HTTP side of the runtime: the control plane at ``/_entities/...`` next to the Durable
Streams protocol at ``/v1/stream/...`` (every entity's stream is readable there)."""

from __future__ import annotations

from ._app import ServeOptions as ServeOptions
from ._app import create_app as create_app
from ._app import serve as serve
from ._app import serve_metrics as serve_metrics

__all__ = ["ServeOptions", "create_app", "serve", "serve_metrics"]
