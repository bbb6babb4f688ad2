"""Service settings from the environment: an explicit transport, errors that name the variable."""

from __future__ import annotations

import logging

import pytest

from framework.bus import MemoryTransport
from framework.bus.kafka import KafkaTransport
from framework.errors import ConfigurationError
from framework.service import Service, ServiceSettings, describe_transport


def test_a_broker_in_the_environment_selects_kafka_without_msa_transport() -> None:
    settings = ServiceSettings.from_env({"KAFKA_BOOTSTRAP": "127.0.0.1:9092"})
    assert settings.transport == "kafka"
    assert isinstance(settings.make_transport(), KafkaTransport)


def test_no_broker_and_no_choice_is_the_in_memory_bus() -> None:
    assert isinstance(ServiceSettings.from_env({}).make_transport(), MemoryTransport)


def test_an_explicit_choice_wins() -> None:
    env = {"KAFKA_BOOTSTRAP": "127.0.0.1:9092", "MSA_TRANSPORT": "memory"}
    assert ServiceSettings.from_env(env).transport == "memory"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KAFKA_BOOTSTRAP": "49092x"}, "KAFKA_BOOTSTRAP='49092x': '49092x' is not host:port"),
        ({"KAFKA_BOOTSTRAP": "kafka:9092,kafka:x"}, "'kafka:x' is not host:port"),
        ({"KAFKA_BOOTSTRAP": "kafka:70000"}, "'kafka:70000' is not host:port"),
        ({"MSA_TRANSPORT": "rabbit"}, "MSA_TRANSPORT must be 'memory' or 'kafka', not 'rabbit'"),
        ({"MSA_HTTP_PORT": "80a"}, "MSA_HTTP_PORT must be a whole number, not '80a'"),
        ({"MSA_SHUTDOWN_GRACE": "soon"}, "MSA_SHUTDOWN_GRACE must be a number, not 'soon'"),
        ({"MSA_TRANSPORT": "kafka"}, "KAFKA_BOOTSTRAP is not set"),
    ],
)
def test_malformed_settings_name_the_variable_and_the_value(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ServiceSettings.from_env(env).make_transport()
    assert message in str(caught.value)


class Quiet(Service):
    name = "quiet"


async def test_a_process_logs_its_transport_and_brokers_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = ServiceSettings(http_port=-1)
    service = Quiet(settings, transport=MemoryTransport())
    with caplog.at_level(logging.INFO, logger="framework.service"):
        await service.start()
        await service.stop()
    [started] = [r.getMessage() for r in caplog.records if "started on" in r.getMessage()]
    assert "the memory transport (in this process only)" in started

    kafka = ServiceSettings.from_env({"KAFKA_BOOTSTRAP": "b1:9092,b2:9092"}).make_transport()
    assert describe_transport(kafka) == "the kafka transport (brokers b1:9092,b2:9092, PLAINTEXT)"
