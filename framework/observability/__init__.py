"""Observability: JSON logs, Prometheus metrics and W3C trace context for every service.

- `metrics`: a `MetricsRegistry` per service (no global state) on `prometheus_client`: its own
  `CollectorRegistry`, rendered in the Prometheus text format.
- `tracing`: `TraceContext` (W3C `traceparent`), the current trace and correlation id as
  contextvars, and `inject` for outgoing calls; `web`: the aiohttp middleware that continues a
  caller's trace (`trace_middleware`).
- `logging`: `JsonFormatter` and `configure_logging`, which put service, correlation id and trace
  id on every line.

Nothing here imports aiohttp until an aiohttp helper is used: `trace_middleware` resolves on
first use.
"""

from typing import TYPE_CHECKING, Any

from framework.observability.logging import JsonFormatter, TextFormatter, configure_logging
from framework.observability.metrics import (
    CONTENT_TYPE,
    DEFAULT_BUCKETS,
    Counter,
    CounterChild,
    Gauge,
    GaugeChild,
    Histogram,
    HistogramChild,
    MetricsRegistry,
)
from framework.observability.tracing import (
    TRACEPARENT,
    TraceContext,
    continue_from,
    current_correlation_id,
    current_trace,
    get_correlation_id,
    get_trace,
    inject,
    use_correlation_id,
    use_trace,
)

if TYPE_CHECKING:
    from framework.observability.web import trace_middleware

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "TRACEPARENT",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "JsonFormatter",
    "MetricsRegistry",
    "TextFormatter",
    "TraceContext",
    "configure_logging",
    "continue_from",
    "current_correlation_id",
    "current_trace",
    "get_correlation_id",
    "get_trace",
    "inject",
    "trace_middleware",
    "use_correlation_id",
    "use_trace",
]


def __getattr__(name: str) -> Any:
    if name == "trace_middleware":
        from framework.observability.web import trace_middleware

        return trace_middleware
    raise AttributeError(f"module 'framework.observability' has no attribute {name!r}")
