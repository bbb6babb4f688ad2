"""The gateway's bus is set up from the environment as a service's is (`transport_from_env`).

No broker is needed: the tests look at the transport the gateway made, before anything connects.
"""

from __future__ import annotations

import pytest

from framework.bus import MemoryTransport
from framework.bus.kafka import KafkaTransport
from framework.gateway.app import Gateway
from framework.gateway.config import GatewayConfigError, parse_config

SASL_ENV = {
    "KAFKA_BOOTSTRAP": "kafka-1.example.invalid:9096,kafka-2.example.invalid:9096",
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "web-gateway",
    "KAFKA_SASL_PASSWORD": "not-a-real-secret",
    "KAFKA_CLIENT_ID": "web-gateway",
}


def config(bus: str) -> str:
    return f"""
gateway: {{name: web}}
bus: {bus}
routes:
  - name: place
    match: {{methods: [POST], path: /orders}}
    publish: {{topic: orders, event_type: gw.order.place}}
"""


def kafka_transport(gateway: Gateway) -> KafkaTransport:
    bus = gateway.make_bus()
    assert bus is not None
    assert isinstance(bus.transport, KafkaTransport)
    return bus.transport


def test_a_gateway_passes_the_environments_sasl_settings_to_its_producer() -> None:
    gateway = Gateway(parse_config(config("{transport: kafka}")), environ=SASL_ENV)

    settings = kafka_transport(gateway).settings
    options = settings.client_options()  # what its producer (and consumers, admin) are given

    assert options["bootstrap_servers"] == SASL_ENV["KAFKA_BOOTSTRAP"]
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "web-gateway"
    assert options["sasl_plain_password"] == "not-a-real-secret"
    assert options["ssl_context"] is not None
    assert options["client_id"] == "web-gateway"


def test_the_configs_bootstrap_servers_replace_only_the_environments_bootstrap() -> None:
    gateway = Gateway(
        parse_config(config("{transport: kafka, bootstrap_servers: 'kafka.internal:9094'}")),
        environ=SASL_ENV,
    )

    settings = kafka_transport(gateway).settings

    assert settings.bootstrap_servers == "kafka.internal:9094"
    assert settings.security_protocol == "SASL_SSL"
    assert settings.sasl_plain_username == "web-gateway"


def test_kafka_without_any_bootstrap_servers_is_refused() -> None:
    gateway = Gateway(parse_config(config("{transport: kafka}")), environ={})

    with pytest.raises(GatewayConfigError, match="bootstrap_servers"):
        gateway.make_bus()


def test_the_in_memory_bus_ignores_the_kafka_settings() -> None:
    gateway = Gateway(parse_config(config("{transport: memory}")), environ=SASL_ENV)

    bus = gateway.make_bus()

    assert bus is not None
    assert isinstance(bus.transport, MemoryTransport)
