"""Operations endpoints: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

``/healthz`` answers while the process serves. ``/readyz`` answers ``200`` when the store
answers a read within 2 s, its schema is at the version this release needs, and, in a process
that runs a worker, that worker's loop went round lately; else ``503`` with the failed checks.
Neither needs a token (load balancers and orchestrators call them). ``/metrics`` is guarded
like the rest of the API when the server has a token.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._metrics import refresh_pending
from .._records import WORKER_NS
from .._runtime import Runtime
from .._worker import Worker
from ._prometheus import CONTENT_TYPE, render

__all__ = ["PUBLIC_PATHS", "ops_routes"]

logger = logging.getLogger("entities.server")

# no token needed: health checks for orchestrators, and the API document (it holds no data)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
STORE_CHECK_SECONDS = 2.0


def ops_routes(runtime: Runtime, worker: Worker | None = None) -> list[Route]:
    """The operations routes over ``runtime`` (and the ``worker`` of this process, if any)."""

    async def metrics(request: Request) -> Response:
        try:
            with anyio.fail_after(STORE_CHECK_SECONDS * 2):
                await refresh_pending(runtime.store, runtime.clock.now())
        except Exception as exc:  # the counters still answer; the gauges keep their last read
            logger.warning("could not read the pending entities for /metrics: %r", exc)
        return Response(render(), media_type=CONTENT_TYPE)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, Any] = {}
        try:
            with anyio.fail_after(STORE_CHECK_SECONDS):
                await runtime.store.kv_get(WORKER_NS, "")
                applied, expected = await runtime.store.schema_versions()
            checks["store"] = "ok"
            checks["migrations"] = (
                "ok"
                if applied >= expected
                else f"schema version {applied}, this release needs {expected}"
            )
        except TimeoutError:
            checks["store"] = f"no answer within {STORE_CHECK_SECONDS:g} s"
        except Exception as exc:
            checks["store"] = f"{type(exc).__name__}: {exc}"
        if worker is not None:
            checks["worker"] = "ok" if worker.alive() else "its loop has not run lately"
        ready = all(value == "ok" for value in checks.values())
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    return [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
    ]
