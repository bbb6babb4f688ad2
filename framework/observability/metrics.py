"""Prometheus metrics without a global registry: counters, gauges, histograms, text exposition.

A `MetricsRegistry` belongs to whoever creates it (a service, the gateway, a test), so two services
in one process (the modular monolith) never share or clash over metric state. It renders the
Prometheus text exposition format 0.0.4, which every Prometheus-compatible scraper reads:

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
    msa_messages_handled_total{topic="orders",outcome="ok"} 1
    ...

Hot path: `metric.labels(...)` returns a child cached per tuple of label values, so after the first
call no child is created again; code on a hot path resolves its children once and then only calls
`inc`/`set`/`observe`, which update a float (or one bucket slot) in place. A histogram stores
per-bucket counts and makes them cumulative only when rendered.

Values computed at scrape time (consumer lag, pool sizes) come from `Gauge.set_function` (one
value) or `Gauge.set_samples_function` (a set of labelled values that changes over time, such as
the lag of each partition currently assigned). A function that raises while being rendered is
logged and its samples are left out, so one broken callback does not take `/metrics` down.

Counters are exposed as `<name>_total` (the suffix is added when the given name lacks it). Updates
are meant to come from the event loop's thread; increments from several threads at once may be
lost, as with any unlocked `+=`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Generic, TypeVar

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
"""The `Content-Type` of `MetricsRegistry.render()`'s output."""

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

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _format_value(value: float) -> str:
    """A sample value as Prometheus reads it (integral values without a trailing `.0`)."""
    value = float(value)  # `set(3)` stores an int
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _format_bound(bound: float) -> str:
    """A bucket's `le` label, written as the Prometheus clients write it (`0.5`, `1.0`, `+Inf`)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_pairs(names: Sequence[str], values: Sequence[str]) -> str:
    """`a="x",b="y"`: the rendered label set of a child, computed once when it is created."""
    return ",".join(
        f'{name}="{_escape_label_value(value)}"' for name, value in zip(names, values, strict=True)
    )


# -- children: what the hot path touches ---------------------------------------------------------


class CounterChild:
    """One labelled series of a counter: a value that only goes up."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ConfigurationError(f"a counter only goes up; cannot add {amount}")
        self._value += amount

    @property
    def value(self) -> float:
        return self._value


class GaugeChild:
    """One labelled series of a gauge: a value that goes up and down, or is computed on scrape."""

    __slots__ = ("_function", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self._value = value

    def inc(self, amount: float = 1) -> None:
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        self._value -= amount

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Compute the value with `function()` at each scrape (None: back to the stored value)."""
        self._function = function

    @property
    def value(self) -> float:
        """The current value; calls the scrape-time function if one is set."""
        if self._function is not None:
            return float(self._function())
        return self._value


class HistogramChild:
    """One labelled series of a histogram: observation counts per bucket, their sum and count."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # ascending, ends with +Inf
        self._counts = [0] * len(bounds)  # per bucket, not cumulative
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # The first bound >= value is the bucket whose `le` covers it; the last bound is +Inf.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum

    def cumulative_counts(self) -> list[tuple[float, int]]:
        """`(upper bound, observations <= bound)` for every bucket, ending with +Inf."""
        running = 0
        out = []
        for bound, count in zip(self._bounds, self._counts, strict=True):
            running += count
            out.append((bound, running))
        return out


ChildT = TypeVar("ChildT", CounterChild, GaugeChild, HistogramChild)


# -- metrics: a name, a help text, label names and the children --------------------------------


class _Metric(Generic[ChildT]):
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
        self._children: dict[tuple[str, ...], ChildT] = {}
        self._rendered_labels: dict[tuple[str, ...], str] = {}
        self._default: ChildT | None = None
        if not labelnames:  # an unlabelled metric is exposed (at zero) from the start
            self._default = self._child(())

    def _new_child(self) -> ChildT:
        raise NotImplementedError

    def _child(self, key: tuple[str, ...]) -> ChildT:
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, self._new_child())
            self._rendered_labels.setdefault(key, _label_pairs(self.labelnames, key))
        return child

    def labels(self, **values: str) -> ChildT:
        """The child for these label values (created on first use, then reused)."""
        key = self._key(values)
        child = self._children.get(key)
        return child if child is not None else self._child(key)

    def remove(self, **values: str) -> None:
        """Forget the child for these label values (e.g. a partition that was revoked)."""
        key = self._key(values)
        self._children.pop(key, None)
        self._rendered_labels.pop(key, None)

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

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} {self.kind}\n")
        self._render_samples(out)

    def _render_samples(self, out: list[str]) -> None:
        raise NotImplementedError


def _braced(pairs: str) -> str:
    return f"{{{pairs}}}" if pairs else ""


class Counter(_Metric[CounterChild]):
    """A count that only goes up, exposed as `<name>_total`."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name if name.endswith("_total") else name + "_total", help, labelnames)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1) -> None:
        """Increment an unlabelled counter."""
        self._unlabelled().inc(amount)

    def _render_samples(self, out: list[str]) -> None:
        labels = self._rendered_labels
        for key, child in list(self._children.items()):
            out.append(f"{self.name}{_braced(labels[key])} {_format_value(child.value)}\n")


class Gauge(_Metric[GaugeChild]):
    """A value that goes up and down, set directly or computed at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._samples_function: Callable[[], Iterable[tuple[Sequence[str], float]]] | None = None

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

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

    def _render_samples(self, out: list[str]) -> None:
        if self._samples_function is not None:
            try:
                samples = [
                    (_label_pairs(self.labelnames, [str(v) for v in values]), float(value))
                    for values, value in self._samples_function()
                ]
            except Exception:
                _log.exception("the samples function of gauge %s failed; skipped", self.name)
                return
            for pairs, value in samples:
                out.append(f"{self.name}{_braced(pairs)} {_format_value(value)}\n")
            return
        labels = self._rendered_labels
        for key, child in list(self._children.items()):
            try:
                value = child.value
            except Exception:
                _log.exception("the function of gauge %s%s failed; skipped", self.name, key)
                continue
            out.append(f"{self.name}{_braced(labels[key])} {_format_value(value)}\n")


class Histogram(_Metric[HistogramChild]):
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
        self._le = tuple(f'le="{_format_bound(b)}"' for b in self.buckets)
        super().__init__(name, help, labelnames)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def _render_samples(self, out: list[str]) -> None:
        labels = self._rendered_labels
        name = self.name
        for key, child in list(self._children.items()):
            pairs = labels[key]
            prefix = pairs + "," if pairs else ""
            running = 0
            for le, count in zip(self._le, child._counts, strict=True):
                running += count
                out.append(f"{name}_bucket{{{prefix}{le}}} {running}\n")
            braced = _braced(pairs)
            out.append(f"{name}_sum{braced} {_format_value(child.sum)}\n")
            out.append(f"{name}_count{braced} {running}\n")


# -- the registry --------------------------------------------------------------------------------

_AnyMetric = Counter | Gauge | Histogram
MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


class MetricsRegistry:
    """The metrics of one service (or gateway), rendered together for `/metrics`.

    Asking again for a name already registered returns the same metric when kind and label names
    match, so independent components can declare the metrics they share; any mismatch is a
    `ConfigurationError`.
    """

    def __init__(self) -> None:
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
        out: list[str] = []
        for metric in list(self._metrics.values()):
            metric._render(out)
        return "".join(out).encode()
