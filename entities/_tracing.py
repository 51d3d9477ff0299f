"""OpenTelemetry traces, when the ``otel`` extra is installed and a tracer provider is set.

Spans: one per HTTP request (the ASGI middleware of ``opentelemetry-instrumentation-asgi``),
one per wake (linked to the spans of the sends that caused it: an inbox message carries the
W3C trace context of its sender), and one per model call, tool call and journaled step.

Without the extra, or without a configured provider (``trace.set_tracer_provider``, or the
``opentelemetry-instrument`` launcher), every function here is a constant-time no-op: the wake
path makes no span objects at all.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, ProxyTracerProvider, SpanKind
except ImportError:  # the optional extra is not installed
    trace = None  # type: ignore[assignment]

__all__ = ["active", "asgi_middleware", "carrier", "span", "tracer_provider", "using"]

_override: Any = None  # a provider set with using(), over the global one

_NO_PROVIDER: tuple[type, ...] = ()
if trace is not None:
    _NO_PROVIDER = (ProxyTracerProvider, trace.NoOpTracerProvider)


_global = [False, -1.0]  # whether a global provider is set, and when that was looked up


def active() -> bool:
    """Whether spans are recorded: the extra is installed and a tracer provider is set (a
    global provider set while running is noticed within a second: the lookup reads the
    environment, too slow for every wake)."""
    if trace is None:
        return False
    if _override is not None:
        return True
    now = time.monotonic()
    if now - _global[1] > 1.0:
        _global[:] = [not isinstance(trace.get_tracer_provider(), _NO_PROVIDER), now]
    return bool(_global[0])


def tracer_provider() -> Any:
    """The provider spans go to: the one of :func:`using`, else the global one."""
    return _override if _override is not None else trace.get_tracer_provider()


@contextlib.contextmanager
def using(provider: Any) -> Iterator[None]:
    """Send this process's spans to ``provider`` (instead of the global one) inside the block:
    for tests and for hosts that keep several providers."""
    global _override
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
    the extra."""
    if trace is None:
        return None
    try:  # imported here: 30 ms, which only a server needs (not every CLI command)
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    except ImportError:
        return None
    return OpenTelemetryMiddleware
