"""The bus's Prometheus metrics: messages in and out, handler latency, retries, lag."""

from __future__ import annotations

from framework.observability.metrics import MetricsRegistry

__all__ = ["BusMetrics"]


class BusMetrics:
    """The bus's Prometheus metrics, registered once per registry."""

    def __init__(self, registry: MetricsRegistry) -> None:
        self.registry = registry
        self.messages_in = registry.counter(
            "msa_messages_in_total",
            "Messages consumed, by outcome (ok, error, invalid, unhandled).",
            ("topic", "type", "outcome"),
        )
        self.messages_out = registry.counter(
            "msa_messages_out_total", "Messages published.", ("topic", "type")
        )
        self.handler_seconds = registry.histogram(
            "msa_handler_seconds", "Handler latency of successful handling.", ("topic", "type")
        )
        self.retries = registry.counter(
            "msa_retries_total", "Handler attempts that failed and were retried.", ("topic", "type")
        )
        self.dead_letters = registry.counter(
            "msa_dead_letters_total", "Messages sent to a dead-letter topic.", ("topic",)
        )
        self.lag = registry.gauge(
            "msa_consumer_lag",
            "Records behind the end of the assigned partitions.",
            ("group", "topic"),
        )
