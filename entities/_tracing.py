"""OpenTelemetry traces, when the ``otel`` extra is installed and a tracer provider is set.

Spans: one per HTTP request (the ASGI middleware of ``opentelemetry-instrumentation-asgi``),
one per wake (linked to the spans of the sends that caused it: an inbox message carries the
W3C trace context of its sender), and one per model call, tool call and journaled step.

Without the extra, or without a configured provider (``trace.set_tracer_provider``, or the
``opentelemetry-instrument`` launcher), every function here is a constant-time no-op: the wake
path makes no span objects at all, and OpenTelemetry is not even imported.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["active", "asgi_middleware", "carrier", "span", "tracer_provider", "using"]

_override: Any = None  # a provider set with using(), over the global one
_global = [False, -1.0]  # whether a global provider is set, and when that was looked up


def _api() -> Any:
    """``opentelemetry.trace`` if the application has loaded it, else ``None``. This module
    never imports OpenTelemetry on its own: an application that sets a tracer provider has
    loaded it, and one that does not pays nothing (not even the import)."""
    return sys.modules.get("opentelemetry.trace")


def active() -> bool:
    """Whether spans are recorded: a tracer provider is set (a global provider set while
    running is noticed within a second: the lookup reads the environment, too slow for every
    wake)."""
    if _override is not None:
        return True
    now = time.monotonic()
    if now - _global[1] > 1.0:
        api = _api()
        _global[:] = [
            api is not None
            and not isinstance(
                api.get_tracer_provider(), (api.ProxyTracerProvider, api.NoOpTracerProvider)
            ),
            now,
        ]
    return bool(_global[0])


def tracer_provider() -> Any:
    """The provider spans go to: the one of :func:`using`, else the global one."""
    if _override is not None:
        return _override
    api = _api()
    return None if api is None else api.get_tracer_provider()


@contextlib.contextmanager
def using(provider: Any) -> Iterator[None]:
    """Send this process's spans to ``provider`` (instead of the global one) inside the block:
    for tests and for hosts that keep several providers."""
    global _override
    import opentelemetry.trace  # noqa: F401  (the SDK's provider has loaded it already)

    previous, _override = _override, provider
    try:
        yield
    finally:
        _override = previous


def carrier() -> dict[str, str] | None:
    """The current trace context (``traceparent``, ``tracestate``) to store with a message, or
    ``None`` when there is no active span."""
    if not active():
        return None
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    out: dict[str, str] = {}
    propagate.inject(out)
    return out or None


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    links: Iterable[Mapping[str, str]] = (),
    kind: str = "internal",
) -> Iterator[Any]:
    """A span named ``name`` around the block (the current one inside it), linked to the spans
    whose contexts ``links`` carry (see :func:`carrier`). Yields the span, or ``None`` when
    tracing is off. An exception leaving the block is recorded on the span."""
    if not active():
        yield None
        return
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind

    span_links = []
    for carried in links:
        context = trace.get_current_span(propagate.extract(dict(carried))).get_span_context()
        if context.is_valid:
            span_links.append(Link(context))
    tracer = tracer_provider().get_tracer("entities")
    with tracer.start_as_current_span(
        name,
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
        links=span_links,
        kind=SpanKind.CONSUMER if kind == "consumer" else SpanKind.INTERNAL,
    ) as current:
        yield current


def asgi_middleware() -> Any:
    """The OpenTelemetry ASGI middleware class (a span per HTTP request), or ``None`` without
    the extra or when the application has not loaded OpenTelemetry (configure the provider
    before the app is created)."""
    if _api() is None:
        return None
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    except ImportError:
        return None
    return OpenTelemetryMiddleware
