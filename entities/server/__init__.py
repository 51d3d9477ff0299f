"""The HTTP side of the runtime: the control plane at ``/_entities/...`` next to the Durable
Streams protocol at ``/v1/stream/...`` (every entity's stream is readable there)."""

from __future__ import annotations

from ._app import ServeOptions as ServeOptions
from ._app import create_app as create_app
from ._app import serve as serve
from ._app import serve_metrics as serve_metrics
from ._auth import AuthConfig as AuthConfig
from ._auth import AuthFileError as AuthFileError
from ._auth import Grant as Grant
from ._auth import Principal as Principal
from ._auth import load_auth as load_auth

__all__ = [
    "AuthConfig",
    "AuthFileError",
    "Grant",
    "Principal",
    "ServeOptions",
    "create_app",
    "load_auth",
    "serve",
    "serve_metrics",
]
