"""The gateway's bus is set up from the environment as a service's is (`transport_from_env`).

No broker is needed: the tests look at the transport the gateway made, before anything connects,
or publish through the in-memory one.
"""

from __future__ import annotations

import aiohttp
import pytest

from framework.bus import Bus, MemoryTransport
from framework.bus.kafka import KafkaTransport
from framework.gateway.app import Gateway
from framework.gateway.config import GatewayConfigError, parse_config
from tests.framework.gateway.conftest import GatewayFactory, base

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


async def test_a_publish_routes_key_can_be_a_path_parameter(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """`key: "{order_id}"` names the route's own path parameter: each record is keyed by it
    (the gateway routes requests itself, so aiohttp's `match_info` does not hold it)."""
    transport = MemoryTransport()
    bus = Bus(transport, source="gw")
    await bus.start()
    try:
        gateway = await make_gateway(
            """
            gateway: {listen: {port: 0}, admin: {port: 0}}
            bus: {transport: memory}
            routes:
              - name: place
                match: {methods: [POST], path: "/orders/{order_id}"}
                publish: {topic: orders, event_type: gw.order.place, key: "{order_id}"}
            """,
            bus=bus,
        )
        for order in ("o-1", "o-2"):
            async with http.post(f"{base(gateway)}/orders/{order}", json={"n": 1}) as response:
                assert response.status == 202, await response.text()
        assert [record.key for record in transport.records("orders")] == [b"o-1", b"o-2"]
    finally:
        await bus.stop()
