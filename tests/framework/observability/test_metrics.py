"""The Prometheus registry: exposition text parsed back, children reuse, registration rules."""

from __future__ import annotations

import logging
import math

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from framework.bus.bus import BusMetrics
from framework.errors import ConfigurationError
from framework.gateway.metering import Meter
from framework.observability.metrics import (
    CONTENT_TYPE,
    DEFAULT_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    MetricsRegistry,
)

Sample = tuple[str, dict[str, str], float]


class Family:
    """One metric family as a scraper reads it, under the name its `# TYPE` line gives."""

    def __init__(self, name: str, kind: str, help: str, samples: list[Sample]) -> None:
        self.name, self.kind, self.help, self.samples = name, kind, help, samples


def parse(exposition: bytes) -> dict[str, Family]:
    """The families of `exposition`, parsed by prometheus_client's own text-format parser."""
    text = exposition.decode()
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    for found in text_string_to_metric_families(text):
        # The parser names a counter's family without the `_total` its samples carry.
        name = found.name + "_total" if found.type == "counter" else found.name
        samples = [(s.name, s.labels, s.value) for s in found.samples]
        families[name] = Family(name, found.type, found.documentation, samples)
    return families


def samples(registry: MetricsRegistry, family: str) -> list[Sample]:
    return parse(registry.render())[family].samples


def test_counter_is_exposed_with_total_suffix_help_and_type() -> None:
    registry = MetricsRegistry()
    handled = registry.counter("msa_handled", "Messages handled.", ("topic", "outcome"))
    handled.labels(topic="orders", outcome="ok").inc()
    handled.labels(topic="orders", outcome="ok").inc(2)
    handled.labels(topic="orders", outcome="error").inc()

    family = parse(registry.render())["msa_handled_total"]

    assert handled.name == "msa_handled_total"
    assert family.help == "Messages handled."
    assert family.kind == "counter"
    assert family.samples == [
        ("msa_handled_total", {"topic": "orders", "outcome": "ok"}, 3.0),
        ("msa_handled_total", {"topic": "orders", "outcome": "error"}, 1.0),
    ]


def test_the_framework_metrics_keep_their_names_types_help_and_labels() -> None:
    """What dashboards and alerts are written against: the bus's and the gateway's families."""
    registry = MetricsRegistry()
    bus = BusMetrics(registry)
    meter = Meter(registry)
    bus.messages_in.labels(topic="orders", type="order.placed", outcome="ok").inc()
    bus.messages_out.labels(topic="orders", type="order.placed").inc(2)
    bus.handler_seconds.labels(topic="orders", type="order.placed").observe(0.003)
    bus.retries.labels(topic="orders", type="order.placed").inc()
    bus.dead_letters.labels(topic="orders").inc()
    bus.lag.labels(group="billing", topic="orders").set_function(lambda: 7)
    meter.record(route="products", client="alice", status=200, bytes_in=10, bytes_out=100)

    families = parse(registry.render())

    assert {name: (f.kind, f.help) for name, f in families.items()} == {
        "msa_messages_in_total": (
            "counter",
            "Messages consumed, by outcome (ok, error, invalid, unhandled).",
        ),
        "msa_messages_out_total": ("counter", "Messages published."),
        "msa_handler_seconds": ("histogram", "Handler latency of successful handling."),
        "msa_retries_total": ("counter", "Handler attempts that failed and were retried."),
        "msa_dead_letters_total": ("counter", "Messages sent to a dead-letter topic."),
        "msa_consumer_lag": ("gauge", "Records behind the end of the assigned partitions."),
        "gateway_requests_total": (
            "counter",
            "Requests through the gateway, by route, client and status class.",
        ),
        "gateway_request_bytes_total": (
            "counter",
            "Body bytes received from (in) and sent to (out) clients, by client.",
        ),
        "gateway_request_seconds": ("histogram", "Time to answer a request, by route."),
    }
    orders = {"topic": "orders", "type": "order.placed"}
    assert families["msa_messages_in_total"].samples == [
        ("msa_messages_in_total", {**orders, "outcome": "ok"}, 1.0)
    ]
    assert families["msa_messages_out_total"].samples == [("msa_messages_out_total", orders, 2.0)]
    assert families["msa_retries_total"].samples == [("msa_retries_total", orders, 1.0)]
    assert families["msa_dead_letters_total"].samples == [
        ("msa_dead_letters_total", {"topic": "orders"}, 1.0)
    ]
    assert families["msa_consumer_lag"].samples == [
        ("msa_consumer_lag", {"group": "billing", "topic": "orders"}, 7.0)
    ]
    latency = families["msa_handler_seconds"].samples
    assert {name for name, _, _ in latency} == {
        "msa_handler_seconds_bucket",
        "msa_handler_seconds_count",
        "msa_handler_seconds_sum",
    }
    assert [labels["le"] for name, labels, _ in latency if name.endswith("_bucket")] == [
        *(str(b) for b in DEFAULT_BUCKETS),
        "+Inf",
    ]
    assert ("msa_handler_seconds_count", orders, 1.0) in latency
    assert ("msa_handler_seconds_sum", orders, 0.003) in latency
    assert families["gateway_requests_total"].samples == [
        (
            "gateway_requests_total",
            {"route": "products", "client": "alice", "status": "2xx"},
            1.0,
        )
    ]
    assert families["gateway_request_bytes_total"].samples == [
        ("gateway_request_bytes_total", {"client": "alice", "direction": "in"}, 10.0),
        ("gateway_request_bytes_total", {"client": "alice", "direction": "out"}, 100.0),
    ]
    assert ("gateway_request_seconds_count", {"route": "products"}, 1.0) in families[
        "gateway_request_seconds"
    ].samples


def test_no_created_series_is_exposed() -> None:
    registry = MetricsRegistry()
    registry.counter("c", "C.", ("k",)).labels(k="v").inc()
    registry.histogram("h", "H.", buckets=(1.0,)).observe(0.5)

    assert b"_created" not in registry.render()
    assert list(parse(registry.render())) == ["c_total", "h"]


def test_a_name_that_already_ends_in_total_is_kept() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("msa_out_total", "Published.")
    assert counter.name == "msa_out_total"
    assert registry.counter("msa_out", "Published.") is counter


def test_unlabelled_metrics_are_exposed_at_zero_before_first_use() -> None:
    registry = MetricsRegistry()
    registry.counter("started", "Starts.")
    registry.gauge("in_flight", "In flight.")
    registry.histogram("latency_seconds", "Latency.", buckets=(1.0,))

    families = parse(registry.render())

    assert families["started_total"].samples == [("started_total", {}, 0.0)]
    assert families["in_flight"].samples == [("in_flight", {}, 0.0)]
    assert families["latency_seconds"].samples == [
        ("latency_seconds_bucket", {"le": "1.0"}, 0.0),
        ("latency_seconds_bucket", {"le": "+Inf"}, 0.0),
        ("latency_seconds_count", {}, 0.0),
        ("latency_seconds_sum", {}, 0.0),
    ]


def test_labelled_metric_has_no_samples_until_labels_are_used() -> None:
    registry = MetricsRegistry()
    registry.counter("failures", "Failures.", ("reason",))

    assert parse(registry.render())["failures_total"].samples == []


def test_children_are_created_once_per_label_values_and_reused() -> None:
    counter = Counter("requests", "Requests.", ("method", "code"))

    first = counter.labels(method="GET", code="200")

    assert counter.labels(code="200", method="GET") is first
    assert counter.labels(method="GET", code="500") is not first
    first.inc()
    assert counter.labels(method="GET", code="200").value == 1


def test_wrong_label_names_are_refused() -> None:
    counter = Counter("requests", "Requests.", ("method",))

    with pytest.raises(ConfigurationError, match="takes labels"):
        counter.labels(verb="GET")
    with pytest.raises(ConfigurationError, match="takes labels"):
        counter.labels(method="GET", code="200")
    with pytest.raises(ConfigurationError, match="takes labels"):
        counter.labels()


def test_a_labelled_metric_cannot_be_updated_without_labels() -> None:
    with pytest.raises(ConfigurationError, match=r"use \.labels"):
        Counter("requests", "Requests.", ("method",)).inc()
    with pytest.raises(ConfigurationError, match=r"use \.labels"):
        Gauge("depth", "Depth.", ("queue",)).set(1)
    with pytest.raises(ConfigurationError, match=r"use \.labels"):
        Histogram("seconds", "Seconds.", ("topic",)).observe(1)


def test_a_counter_only_goes_up() -> None:
    counter = Counter("requests", "Requests.")
    with pytest.raises(ConfigurationError, match="only goes up"):
        counter.inc(-1)
    counter.inc(0.5)
    assert counter.labels().value == 0.5


@pytest.mark.parametrize("name", ["", "1abc", "has-dash", "has space"])
def test_invalid_metric_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid metric name"):
        MetricsRegistry().gauge(name, "Bad.")


@pytest.mark.parametrize("labelnames", [("__reserved",), ("bad-label",), ("a", "a")])
def test_invalid_label_names_are_refused(labelnames: tuple[str, ...]) -> None:
    with pytest.raises(ConfigurationError):
        MetricsRegistry().gauge("fine", "Fine.", labelnames)


def test_gauge_set_inc_dec() -> None:
    registry = MetricsRegistry()
    depth = registry.gauge("queue_depth", "Queued.", ("queue",))
    child = depth.labels(queue="a")
    child.set(10)
    child.inc(5)
    child.dec(2.5)

    assert samples(registry, "queue_depth") == [("queue_depth", {"queue": "a"}, 12.5)]
    assert child.value == 12.5


def test_gauge_function_is_called_at_scrape_time() -> None:
    registry = MetricsRegistry()
    lag = registry.gauge("consumer_lag", "Lag.")
    behind = [3]
    lag.set_function(lambda: behind[0])

    assert samples(registry, "consumer_lag") == [("consumer_lag", {}, 3.0)]
    behind[0] = 7
    assert samples(registry, "consumer_lag") == [("consumer_lag", {}, 7.0)]

    lag.set_function(None)
    lag.set(1)
    assert samples(registry, "consumer_lag") == [("consumer_lag", {}, 1.0)]


def test_child_function_is_called_at_scrape_time() -> None:
    registry = MetricsRegistry()
    lag = registry.gauge("consumer_lag", "Lag.", ("group",))
    lag.labels(group="g").set_function(lambda: 41 + 1)

    assert samples(registry, "consumer_lag") == [("consumer_lag", {"group": "g"}, 42.0)]


def test_samples_function_replaces_children_with_the_current_set() -> None:
    registry = MetricsRegistry()
    lag = registry.gauge("partition_lag", "Lag.", ("topic", "partition"))
    assigned = {("orders", "0"): 3, ("orders", "1"): 0}
    lag.set_samples_function(lambda: list(assigned.items()))

    assert samples(registry, "partition_lag") == [
        ("partition_lag", {"topic": "orders", "partition": "0"}, 3.0),
        ("partition_lag", {"topic": "orders", "partition": "1"}, 0.0),
    ]
    del assigned["orders", "0"]
    assert samples(registry, "partition_lag") == [
        ("partition_lag", {"topic": "orders", "partition": "1"}, 0.0)
    ]


def test_a_failing_function_is_logged_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    registry = MetricsRegistry()

    def broken() -> float:
        raise RuntimeError("consumer is gone")

    def broken_samples() -> list[tuple[tuple[str, ...], float]]:
        raise RuntimeError("consumer is gone")

    registry.gauge("lag", "Lag.", ("group",)).labels(group="g").set_function(broken)
    registry.gauge("all_lag", "Lag.", ("group",)).set_samples_function(broken_samples)
    registry.counter("ok", "Still rendered.").inc()

    with caplog.at_level(logging.ERROR, logger="framework.observability.metrics"):
        families = parse(registry.render())

    assert families["lag"].samples == []
    assert families["all_lag"].samples == []
    assert families["ok_total"].samples == [("ok_total", {}, 1.0)]
    assert [r.getMessage() for r in caplog.records] == [
        "the function of gauge lag('g',) failed; skipped",
        "the samples function of gauge all_lag failed; skipped",
    ]


def test_removed_child_disappears_from_output() -> None:
    registry = MetricsRegistry()
    lag = registry.gauge("lag", "Lag.", ("partition",))
    lag.labels(partition="0").set(1)
    lag.labels(partition="1").set(2)

    lag.remove(partition="0")

    assert samples(registry, "lag") == [("lag", {"partition": "1"}, 2.0)]
    assert lag.labels(partition="0").value == 0  # a new series, from zero


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    registry = MetricsRegistry()
    seconds = registry.histogram("handler_seconds", "Handler time.", ("topic",))
    child = seconds.labels(topic="orders")
    observed = [0.0003, 0.0005, 0.004, 0.07, 0.07, 3.0, 100.0]
    for value in observed:
        child.observe(value)

    found = samples(registry, "handler_seconds")
    topic = {"topic": "orders"}
    buckets = {
        float(labels["le"]): value
        for name, labels, value in found
        if name == "handler_seconds_bucket"
    }

    assert list(buckets) == [*DEFAULT_BUCKETS, math.inf]
    for bound, count in buckets.items():  # `le` is inclusive: 0.0005 counts in le="0.0005"
        assert count == sum(1 for v in observed if v <= bound), bound
    assert buckets[0.0005] == 2
    assert buckets[0.1] == 5
    assert buckets[10.0] == 6
    assert buckets[math.inf] == 7
    assert ("handler_seconds_count", topic, 7.0) in found
    [total] = [value for name, _, value in found if name == "handler_seconds_sum"]
    assert total == pytest.approx(sum(observed))
    assert child.count == 7
    assert child.sum == pytest.approx(sum(observed))


def test_histogram_bucket_lines_carry_le_with_the_other_labels() -> None:
    registry = MetricsRegistry()
    registry.histogram("h", "H.", ("topic",), buckets=(0.5, 2)).labels(topic="t").observe(1)

    lines = registry.render().decode().splitlines()

    assert lines == [
        "# HELP h H.",
        "# TYPE h histogram",
        'h_bucket{le="0.5",topic="t"} 0.0',
        'h_bucket{le="2.0",topic="t"} 1.0',
        'h_bucket{le="+Inf",topic="t"} 1.0',
        'h_count{topic="t"} 1.0',
        'h_sum{topic="t"} 1.0',
    ]


@pytest.mark.parametrize("buckets", [(), (1.0, 0.5), (1.0, 1.0)])
def test_histogram_buckets_must_be_strictly_ascending(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ConfigurationError, match="ascending"):
        Histogram("h", "H.", buckets=buckets)


def test_histogram_cannot_have_an_le_label() -> None:
    with pytest.raises(ConfigurationError, match="'le'"):
        Histogram("h", "H.", ("le",))


def test_label_values_and_help_are_escaped_and_parse_back() -> None:
    registry = MetricsRegistry()
    tricky = 'C:\\path "quoted"\nsecond line'
    registry.counter("odd", 'Help with \\ and\nnewline and "quotes".', ("value",)).labels(
        value=tricky
    ).inc()

    text = registry.render().decode()
    family = parse(registry.render())["odd_total"]

    assert '{value="C:\\\\path \\"quoted\\"\\nsecond line"}' in text
    assert '# HELP odd_total Help with \\\\ and\\nnewline and "quotes".\n' in text
    assert family.samples == [("odd_total", {"value": tricky}, 1.0)]
    assert family.help == 'Help with \\ and\nnewline and "quotes".'


def test_special_values_are_written_as_prometheus_spells_them() -> None:
    registry = MetricsRegistry()
    gauge = registry.gauge("g", "G.", ("v",))
    gauge.labels(v="inf").set(math.inf)
    gauge.labels(v="-inf").set(-math.inf)
    gauge.labels(v="nan").set(math.nan)
    gauge.labels(v="frac").set(0.25)

    lines = registry.render().decode().splitlines()[2:]

    assert lines == ['g{v="inf"} +Inf', 'g{v="-inf"} -Inf', 'g{v="nan"} NaN', 'g{v="frac"} 0.25']


def test_reregistering_the_same_kind_returns_the_existing_metric() -> None:
    registry = MetricsRegistry()
    first = registry.histogram("h", "H.", ("topic",))
    first.labels(topic="t").observe(1)

    again = registry.histogram("h", "H.", ("topic",))

    assert again is first
    assert len(registry) == 1
    assert registry.get("h") is first
    assert registry.render().count(b"# TYPE h histogram") == 1


def test_reregistering_with_another_kind_raises() -> None:
    registry = MetricsRegistry()
    registry.gauge("things", "Things.")

    with pytest.raises(ConfigurationError, match="already registered as a gauge"):
        registry.histogram("things", "Things.")
    registry.counter("x", "X.")
    with pytest.raises(ConfigurationError, match="already registered as a counter"):
        registry.gauge("x_total", "X.")


def test_reregistering_with_other_labels_or_buckets_raises() -> None:
    registry = MetricsRegistry()
    registry.histogram("h", "H.", ("topic",), buckets=(1, 2))

    with pytest.raises(ConfigurationError, match="labels"):
        registry.histogram("h", "H.", ("type",), buckets=(1, 2))
    with pytest.raises(ConfigurationError, match="buckets"):
        registry.histogram("h", "H.", ("topic",), buckets=(1, 3))


def test_registries_do_not_share_state() -> None:
    one, two = MetricsRegistry(), MetricsRegistry()
    one.counter("c", "C.").inc()

    assert "c_total" in one
    assert "c_total" not in two
    assert two.render() == b""
    assert prometheus_client.REGISTRY.get_sample_value("c_total") is None  # not the global one


def test_the_collector_registry_answers_prometheus_client_queries() -> None:
    registry = MetricsRegistry()
    registry.counter("c", "C.", ("k",)).labels(k="v").inc(3)

    assert registry.collector_registry.get_sample_value("c_total", {"k": "v"}) == 3


def test_metrics_render_in_registration_order() -> None:
    registry = MetricsRegistry()
    registry.gauge("b", "B.")
    registry.counter("a", "A.")

    assert list(parse(registry.render())) == ["b", "a_total"]


def test_content_type_is_the_text_format_0_0_4() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
