"""The `KAFKA_*` variables, read in one place (`framework.bus.kafka_env`) for both Kafka clients:
`KafkaSettings.from_env` (aiokafka) and `ConfluentSettings.from_env` (librdkafka) read the same
variables into the same fields and refuse the same bad values with the same messages.

No broker is needed: settings are only built.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from framework.bus.confluent import ConfluentSettings
from framework.bus.kafka import KafkaSettings
from framework.bus.kafka_env import kafka_options_from_env, malformed_brokers
from framework.errors import ConfigurationError

SHARED_FIELDS = (
    "bootstrap_servers",
    "client_id",
    "linger_ms",
    "compression_type",
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
)


def test_the_module_imports_neither_client_and_confluent_does_not_import_aiokafka() -> None:
    # In a fresh interpreter: this one has imported both clients already.
    code = (
        "import sys\n"
        "import framework.bus.kafka_env\n"
        "assert 'aiokafka' not in sys.modules, 'kafka_env imported aiokafka'\n"
        "assert 'confluent_kafka' not in sys.modules, 'kafka_env imported confluent_kafka'\n"
        "import framework.bus.confluent\n"
        "assert 'framework.bus.kafka' not in sys.modules, 'confluent imported kafka'\n"
        "assert 'aiokafka' not in sys.modules, 'confluent imported aiokafka'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("bootstrap", "malformed"),
    [
        ("k:9092", []),
        ("k1:9092, k2:9093", []),
        ("[::1]:9092", []),
        ("k1:9092,,", []),
        ("nohost", ["nohost"]),
        (":9092", [":9092"]),
        ("k:0,k:65536,k:65535", ["k:0", "k:65536"]),
        ("k:port", ["k:port"]),
    ],
)
def test_malformed_brokers(bootstrap: str, malformed: list[str]) -> None:
    assert malformed_brokers(bootstrap) == malformed


def test_the_options_from_the_variables() -> None:
    env = {
        "ORDERS_KAFKA_BOOTSTRAP": " k1:9092,k2:9092 ",
        "ORDERS_KAFKA_CLIENT_ID": "orders",
        "ORDERS_KAFKA_LINGER_MS": "20",
        "ORDERS_KAFKA_COMPRESSION": "None",
        "ORDERS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "ORDERS_KAFKA_SASL_MECHANISM": "scram-sha-256",
        "ORDERS_KAFKA_SASL_USERNAME": "orders",
        "ORDERS_KAFKA_SASL_PASSWORD": "s3cret",
        "ORDERS_KAFKA_SSL_CA_LOCATION": "/etc/ca.pem",
        "KAFKA_BOOTSTRAP": "other:9092",  # another prefix: not read
    }
    common = {
        "bootstrap_servers": "k1:9092,k2:9092",
        "client_id": "orders",
        "linger_ms": 20,
        "compression_type": None,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "orders",
        "sasl_plain_password": "s3cret",
    }
    assert kafka_options_from_env("ORDERS_KAFKA_", env) == common
    with_ca = kafka_options_from_env("ORDERS_KAFKA_", env, ssl_ca_location=True)
    assert with_ca == {**common, "ssl_ca_location": "/etc/ca.pem"}


def test_unset_and_blank_variables_leave_the_defaults() -> None:
    env = {"KAFKA_BOOTSTRAP": "k:9092", "KAFKA_CLIENT_ID": "  ", "KAFKA_LINGER_MS": ""}
    assert kafka_options_from_env(environ=env) == {
        "bootstrap_servers": "k:9092",
        "sasl_plain_username": None,
        "sasl_plain_password": None,
    }


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "from-os:9092")
    assert kafka_options_from_env()["bootstrap_servers"] == "from-os:9092"
    assert KafkaSettings.from_env().bootstrap_servers == "from-os:9092"
    assert ConfluentSettings.from_env().bootstrap_servers == "from-os:9092"


def test_both_clients_read_the_same_variables_into_the_same_fields() -> None:
    env = {
        "KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
        "KAFKA_CLIENT_ID": "orders",
        "KAFKA_LINGER_MS": "20",
        "KAFKA_COMPRESSION": "zstd",
        "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "KAFKA_SASL_MECHANISM": "scram-sha-512",
        "KAFKA_SASL_USERNAME": "orders",
        "KAFKA_SASL_PASSWORD": "s3cret",
        "KAFKA_SSL_CA_LOCATION": "/etc/ca.pem",
    }
    aiokafka = KafkaSettings.from_env(environ=env)
    confluent = ConfluentSettings.from_env(environ=env)
    for name in SHARED_FIELDS:
        assert getattr(aiokafka, name) == getattr(confluent, name), name
    assert confluent.ssl_ca_location == "/etc/ca.pem"
    assert not hasattr(aiokafka, "ssl_ca_location")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {},
            "KAFKA_BOOTSTRAP is not set: give the Kafka bootstrap servers as "
            "host:port[,host:port], e.g. KAFKA_BOOTSTRAP=127.0.0.1:9092",
        ),
        (
            {"KAFKA_BOOTSTRAP": "   "},
            "KAFKA_BOOTSTRAP is not set",
        ),
        (
            {"KAFKA_BOOTSTRAP": "k:9092,nohost,k:99999"},
            "KAFKA_BOOTSTRAP='k:9092,nohost,k:99999': 'nohost', 'k:99999' is not host:port "
            "(a port from 1 to 65535); give host:port[,host:port], e.g. "
            "KAFKA_BOOTSTRAP=127.0.0.1:9092",
        ),
        (
            {"KAFKA_BOOTSTRAP": "k:9092", "KAFKA_LINGER_MS": "soon"},
            "KAFKA_LINGER_MS must be a whole number of milliseconds, not 'soon'",
        ),
    ],
)
def test_both_clients_refuse_a_bad_variable_with_the_same_message(
    env: dict[str, str], message: str
) -> None:
    errors = []
    for settings in (KafkaSettings, ConfluentSettings):
        with pytest.raises(ConfigurationError) as caught:
            settings.from_env(environ=env)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]
    assert errors[0].startswith(message)


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("KAFKA_COMPRESSION", "brotli", "compression_type must be one of"),
        ("KAFKA_SECURITY_PROTOCOL", "TLS", "security_protocol must be one of"),
        ("KAFKA_SASL_MECHANISM", "GSSAPI", "sasl_mechanism must be one of"),
    ],
)
def test_both_clients_check_the_values_in_their_settings(
    variable: str, value: str, problem: str
) -> None:
    env = {"KAFKA_BOOTSTRAP": "k:9092", variable: value}
    with pytest.raises(ConfigurationError, match=f"Invalid KafkaSettings: {problem}"):
        KafkaSettings.from_env(environ=env)
    with pytest.raises(ConfigurationError, match=f"Invalid ConfluentSettings: {problem}"):
        ConfluentSettings.from_env(environ=env)
