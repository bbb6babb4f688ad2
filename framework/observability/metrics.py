"""Prometheus metrics on `prometheus_client`, with one registry per service and no global state.

A `MetricsRegistry` belongs to whoever creates it (a service, the gateway, a test) and holds its
own `prometheus_client.CollectorRegistry`, so two services in one process (the modular monolith)
never share or clash over metric state, and nothing lands in prometheus_client's global
`REGISTRY`. `render()` is `generate_latest` of that registry: the Prometheus text format 0.0.4.

    >>> registry = MetricsRegistry()
    >>> handled = registry.counter(
    ...     "msa_messages_handled", "Messages handled, by topic and outcome.", ("topic", "outcome")
    ... )
    >>> latency = registry.histogram(
    ...     "msa_handler_seconds", "Time spent in message handlers.", ("topic",)
    ... )
    >>> ok = handled.labels(topic="orders", outcome="ok")  # resolve once, keep the child
    >>> ok.inc()
    >>> latency.labels(topic="orders").observe(0.0042)
    >>> print(registry.render().decode())  # doctest: +ELLIPSIS
    # HELP msa_messages_handled_total Messages handled, by topic and outcome.
    # TYPE msa_messages_handled_total counter
    msa_messages_handled_total{outcome="ok",topic="orders"} 1.0
    ...

What this module adds to prometheus_client, and why it wraps rather than re-exports:

- `labels(**values)` takes keywords only and returns a child cached per tuple of label values, so
  code on a hot path resolves its children once and then only calls `inc`/`set`/`observe`.
- Misuse (bad names, wrong labels, a negative increment, re-registering a name as another kind)
  is a `ConfigurationError`, raised when the metric is declared or used, not at scrape time.
- Asking again for a registered name returns the same metric, so independent components can
  declare the metrics they share.
- Counters and histograms are exposed without prometheus_client's `_created` series, so
  `/metrics` shows the families it showed before this module used prometheus_client.
- A gauge's value can be computed at scrape time (`set_function`, or `set_samples_function` for a
  set of labelled series that changes on its own, such as the lag of each partition assigned); a
  function that raises is logged and its samples are left out, so one broken callback does not
  take `/metrics` down.
- `child.value` (and a histogram child's `count` and `sum`) read a series back through
  prometheus_client's public `collect()`, for tests and readiness checks.

Counters are exposed as `<name>_total` (the suffix is added when the given name lacks it).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Generic, TypeVar

import prometheus_client as prom
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from framework.errors import ConfigurationError

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "MetricsRegistry",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The `Content-Type` of `MetricsRegistry.render()`'s output.

Not `prometheus_client.CONTENT_TYPE_LATEST`, which newer releases set to the 1.0.0 text format
(UTF-8 names) that Prometheus 2 does not know; our names are checked to be classic ones, so the
output is valid 0.0.4 text and every Prometheus-compatible scraper reads it."""

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Latency buckets in seconds for message handling: half a millisecond up to ten seconds."""

_log = logging.getLogger(__name__)

# The classic names only: recent prometheus_client releases also accept UTF-8 names, which the
# 0.0.4 text format cannot carry.
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _read(series: MetricWrapperBase, suffix: str = "") -> float:
    """The value of one series' `<name><suffix>` sample, read through its public `collect()`."""
    for family in series.collect():
        name = family.name + suffix
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise LookupError(f"no {suffix or 'value'} sample in {series!r}")


# -- children: what the hot path touches ---------------------------------------------------------


class CounterChild:
    """One labelled series of a counter: a value that only goes up."""

    __slots__ = ("_series",)

    def __init__(self, series: prom.Counter) -> None:
        self._series = series

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ConfigurationError(f"a counter only goes up; cannot add {amount}")
        self._series.inc(amount)

    @property
    def value(self) -> float:
        return _read(self._series, "_total")


class GaugeChild:
    """One labelled series of a gauge: a value that goes up and down, or is computed on scrape."""

    __slots__ = ("_function", "_series")

    def __init__(self, series: prom.Gauge) -> None:
        self._series = series
        self._function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self._series.set(value)

    def inc(self, amount: float = 1) -> None:
        self._series.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._series.dec(amount)

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Compute the value with `function()` at each scrape (None: back to the stored value)."""
        self._function = function

    @property
    def value(self) -> float:
        """The current value; calls the scrape-time function if one is set."""
        if self._function is not None:
            return float(self._function())
        return _read(self._series)


class HistogramChild:
    """One labelled series of a histogram: observation counts per bucket, their sum and count."""

    __slots__ = ("_series",)

    def __init__(self, series: prom.Histogram) -> None:
        self._series = series

    def observe(self, value: float) -> None:
        self._series.observe(value)

    @property
    def count(self) -> int:
        return int(_read(self._series, "_count"))

    @property
    def sum(self) -> float:
        return _read(self._series, "_sum")


SeriesT = TypeVar("SeriesT", bound=MetricWrapperBase)
ChildT = TypeVar("ChildT", CounterChild, GaugeChild, HistogramChild)


# -- metrics: a name, a help text, label names and the children --------------------------------


class _Metric(Generic[SeriesT, ChildT]):
    """A prometheus_client metric (`_series`) and our children of it; a prometheus_client
    `Collector` itself, registered in its `MetricsRegistry`'s `CollectorRegistry`."""

    kind: ClassVar[str]

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ConfigurationError(f"invalid metric name {name!r}")
        labelnames = tuple(labelnames)
        for label in labelnames:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ConfigurationError(f"invalid label name {label!r} for metric {name!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ConfigurationError(f"duplicate label names {labelnames!r} for metric {name!r}")
        self.name = name
        self.help = help
        self.labelnames: tuple[str, ...] = labelnames
        self._series = self._new_series()
        self._children: dict[tuple[str, ...], ChildT] = {}
        self._default: ChildT | None = None
        if not labelnames:  # an unlabelled metric is exposed (at zero) from the start
            self._default = self._children[()] = self._new_child(self._series)

    def _new_series(self) -> SeriesT:
        raise NotImplementedError

    def _new_child(self, series: SeriesT) -> ChildT:
        raise NotImplementedError

    def labels(self, **values: str) -> ChildT:
        """The child for these label values (created on first use, then reused)."""
        key = self._key(values)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, self._new_child(self._series.labels(*key)))
        return child

    def remove(self, **values: str) -> None:
        """Forget the child for these label values (e.g. a partition that was revoked)."""
        if not self.labelnames:
            raise ConfigurationError(f"metric {self.name!r} has no labels to remove")
        key = self._key(values)
        self._children.pop(key, None)
        self._series.remove(*key)

    def _key(self, values: dict[str, str]) -> tuple[str, ...]:
        try:
            key = tuple([str(values[name]) for name in self.labelnames])
        except KeyError:
            key = ()
        if len(values) != len(self.labelnames) or len(key) != len(values):
            raise ConfigurationError(
                f"metric {self.name!r} takes labels {self.labelnames!r}, got {sorted(values)!r}"
            )
        return key

    def _unlabelled(self) -> ChildT:
        if self._default is None:
            raise ConfigurationError(
                f"metric {self.name!r} has labels {self.labelnames!r}; use .labels(...) first"
            )
        return self._default

    def collect(self) -> Iterable[Metric]:
        """prometheus_client's samples of this metric, without the `_created` series."""
        families = list(self._series.collect())
        for family in families:
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
        return families


class Counter(_Metric[prom.Counter, CounterChild]):
    """A count that only goes up, exposed as `<name>_total`."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name if name.endswith("_total") else name + "_total", help, labelnames)

    def _new_series(self) -> prom.Counter:
        return prom.Counter(self.name, self.help, self.labelnames, registry=None)

    def _new_child(self, series: prom.Counter) -> CounterChild:
        return CounterChild(series)

    def inc(self, amount: float = 1) -> None:
        """Increment an unlabelled counter."""
        self._unlabelled().inc(amount)


class Gauge(_Metric[prom.Gauge, GaugeChild]):
    """A value that goes up and down, set directly or computed at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._samples_function: Callable[[], Iterable[tuple[Sequence[str], float]]] | None = None

    def _new_series(self) -> prom.Gauge:
        return prom.Gauge(self.name, self.help, self.labelnames, registry=None)

    def _new_child(self, series: prom.Gauge) -> GaugeChild:
        return GaugeChild(series)

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._unlabelled().dec(amount)

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Compute an unlabelled gauge's value with `function()` at each scrape.

        >>> lag = MetricsRegistry().gauge("msa_consumer_lag", "Records behind the partition end.")
        >>> lag.set_function(lambda: 42)
        """
        self._unlabelled().set_function(function)

    def set_samples_function(
        self, function: Callable[[], Iterable[tuple[Sequence[str], float]]] | None
    ) -> None:
        """Compute all of a labelled gauge's series at each scrape.

        `function()` yields `(label values in labelnames order, value)` pairs; they replace the
        children set through `.labels(...)` in the output. Fits a set of series that changes on
        its own, such as the lag of each partition a consumer holds right now:

        >>> lag = MetricsRegistry().gauge(
        ...     "msa_consumer_lag", "Records behind the partition end.", ("topic", "partition")
        ... )
        >>> lag.set_samples_function(lambda: [(("orders", "0"), 3), (("orders", "1"), 0)])
        """
        self._samples_function = function

    def collect(self) -> Iterable[Metric]:
        """The children's values, or the samples function's; what raises is logged and left out."""
        family = GaugeMetricFamily(self.name, self.help, labels=self.labelnames)
        if self._samples_function is not None:
            try:
                samples = [
                    ([str(v) for v in values], float(value))
                    for values, value in self._samples_function()
                ]
            except Exception:
                _log.exception("the samples function of gauge %s failed; skipped", self.name)
                samples = []
            for labels, value in samples:
                family.add_metric(labels, value)
            return [family]
        for key, child in list(self._children.items()):
            try:
                value = child.value
            except Exception:
                _log.exception("the function of gauge %s%s failed; skipped", self.name, key)
                continue
            family.add_metric(key, value)
        return [family]


class Histogram(_Metric[prom.Histogram, HistogramChild]):
    """Observations counted in buckets (`_bucket{le=...}`), with their `_sum` and `_count`."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if "le" in labelnames:
            raise ConfigurationError(f"histogram {name!r} cannot have a label named 'le'")
        bounds = [float(b) for b in buckets]
        if not bounds or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ConfigurationError(f"buckets of histogram {name!r} must be strictly ascending")
        if not math.isinf(bounds[-1]):
            bounds.append(math.inf)
        self.buckets: tuple[float, ...] = tuple(bounds)
        super().__init__(name, help, labelnames)

    def _new_series(self) -> prom.Histogram:
        return prom.Histogram(
            self.name, self.help, self.labelnames, registry=None, buckets=self.buckets
        )

    def _new_child(self, series: prom.Histogram) -> HistogramChild:
        return HistogramChild(series)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)


# -- the registry --------------------------------------------------------------------------------

_AnyMetric = Counter | Gauge | Histogram
MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


class MetricsRegistry:
    """The metrics of one service (or gateway), rendered together for `/metrics`.

    Asking again for a name already registered returns the same metric when kind and label names
    match, so independent components can declare the metrics they share; any mismatch is a
    `ConfigurationError`. `collector_registry` is the prometheus_client registry behind it, for
    prometheus_client's own tools (`push_to_gateway`, `make_aiohttp_handler`, more collectors).
    """

    def __init__(self) -> None:
        self.collector_registry = prom.CollectorRegistry()
        self._metrics: dict[str, _AnyMetric] = {}

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._register(Counter, Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._register(Gauge, Gauge(name, help, labelnames))

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        return self._register(Histogram, Histogram(name, help, labelnames, buckets))

    def _register(self, kind: type[MetricT], metric: MetricT) -> MetricT:
        existing = self._metrics.get(metric.name)
        if existing is None:
            self._metrics[metric.name] = metric
            self.collector_registry.register(metric)
            return metric
        if not isinstance(existing, kind):
            raise ConfigurationError(
                f"metric {metric.name!r} is already registered as a {existing.kind}, "
                f"not a {metric.kind}"
            )
        if existing.labelnames != metric.labelnames:
            raise ConfigurationError(
                f"metric {metric.name!r} is already registered with labels "
                f"{existing.labelnames!r}, not {metric.labelnames!r}"
            )
        if (
            isinstance(existing, Histogram)
            and isinstance(metric, Histogram)
            and existing.buckets != metric.buckets
        ):
            raise ConfigurationError(
                f"histogram {metric.name!r} is already registered with other buckets"
            )
        return existing

    def get(self, name: str) -> Counter | Gauge | Histogram | None:
        """The metric registered under `name` (a counter's full `_total` name), or None."""
        return self._metrics.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._metrics

    def __len__(self) -> int:
        return len(self._metrics)

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format 0.0.4 (see `CONTENT_TYPE`)."""
        return prom.generate_latest(self.collector_registry)
