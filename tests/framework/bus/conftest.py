"""The bus suites here run on every transport: in memory, and on the real Kafka through each
of its two clients, aiokafka (`[kafka]`) and librdkafka (`[confluent]`, `KAFKA_CLIENT=confluent`).

This overrides the project-wide `make_transport` (tests/conftest.py) for this folder only, where
the transport contract itself is under test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from framework.bus import MemoryTransport
from framework.types import Transport


@pytest.fixture(
    params=[
        "memory",
        pytest.param("kafka", marks=pytest.mark.kafka),
        pytest.param("confluent", marks=pytest.mark.kafka),
    ]
)
def make_transport(request: pytest.FixtureRequest) -> Callable[[], Transport]:
    """One in-memory "cluster" per test (every call returns the same `MemoryTransport`, like
    one broker), or a new client of the real Kafka on aiokafka or on librdkafka."""
    if request.param == "memory":
        shared = MemoryTransport()
        return lambda: shared
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    if request.param == "confluent":
        from framework.bus.confluent import ConfluentSettings, ConfluentTransport

        return lambda: ConfluentTransport(
            ConfluentSettings(bootstrap_servers=bootstrap, linger_ms=1)
        )
    from framework.bus.kafka import KafkaSettings, KafkaTransport

    return lambda: KafkaTransport(KafkaSettings(bootstrap_servers=bootstrap, linger_ms=1))
