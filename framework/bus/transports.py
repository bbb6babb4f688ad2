"""Which transport a process uses, read from the environment in one place: `transport_from_env`.

    transport = transport_from_env()                 # os.environ
    transport = transport_from_env(env, name="kafka")   # the caller's config names it

`MSA_TRANSPORT` names the transport (`memory` or `kafka`); when it is unset, a set
`KAFKA_BOOTSTRAP` means Kafka (a process given a broker never falls back to the in-memory bus in
silence), and neither means the in-memory bus. The Kafka transport takes every `KAFKA_*`
variable `KafkaSettings.from_env` reads (bootstrap servers, client id, compression, and the
`KAFKA_SECURITY_PROTOCOL`/`KAFKA_SASL_*` settings a managed Kafka needs). Services
(`ServiceSettings.make_transport`), the gateway and the CLI all build their transport here, so
none of them reads a subset of the variables.

`KAFKA_CLIENT` picks the Kafka client behind the `kafka` transport: `aiokafka` (the default,
`framework.bus.kafka`, extra `kafka`) or `confluent` (librdkafka, `framework.bus.confluent`,
extra `kafka-confluent`), for throughput. Both keep the same contract and read the same
`KAFKA_*` variables, and both are named `kafka`: the broker and the wire format are the same,
so whatever checks for Kafka (the gateway, the streams) holds for either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from framework.bus.memory import MemoryTransport
from framework.errors import ConfigurationError
from framework.types import Transport

__all__ = ["KAFKA_CLIENTS", "TRANSPORTS", "kafka_client", "transport_from_env", "transport_name"]

TRANSPORTS = ("memory", "kafka")
"""The transports `MSA_TRANSPORT` can name."""

KAFKA_CLIENTS = ("aiokafka", "confluent")
"""The clients `KAFKA_CLIENT` can name for the `kafka` transport (the first is the default)."""


def transport_name(env: Mapping[str, str] | None = None) -> str:
    """The transport the environment names (see the module docstring); a name not in
    `TRANSPORTS` is a `ConfigurationError` naming the variable and the value."""
    env = os.environ if env is None else env
    default = "kafka" if env.get("KAFKA_BOOTSTRAP", "").strip() else "memory"
    name = env.get("MSA_TRANSPORT", "").strip().lower() or default
    if name not in TRANSPORTS:
        raise ConfigurationError(f"MSA_TRANSPORT must be 'memory' or 'kafka', not {name!r}")
    return name


def transport_from_env(
    env: Mapping[str, str] | None = None, *, name: str | None = None
) -> Transport:
    """A new, not started transport: `name` (default: the one the environment names), with
    its settings from `env` (default: `os.environ`).

    Raises `ConfigurationError` for an unknown name, a missing or malformed `KAFKA_*` variable,
    or the Kafka transport without its extra (`pip install "msa-framework[kafka]"`, or
    `[kafka-confluent]` with `KAFKA_CLIENT=confluent`).
    """
    env = os.environ if env is None else env
    name = transport_name(env) if name is None else name
    if name == "memory":
        return MemoryTransport()
    if name == "kafka":
        if kafka_client(env) == "confluent":
            return _confluent_transport(env)
        try:
            from framework.bus.kafka import KafkaSettings, KafkaTransport
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ConfigurationError(
                'the Kafka transport needs aiokafka: pip install "msa-framework[kafka]"'
            ) from exc
        return KafkaTransport(KafkaSettings.from_env(environ=env))
    raise ConfigurationError(f"the transport must be 'memory' or 'kafka', not {name!r}")


def kafka_client(env: Mapping[str, str] | None = None) -> str:
    """The Kafka client `KAFKA_CLIENT` names (default `aiokafka`); another name is a
    `ConfigurationError` naming the variable and the value."""
    env = os.environ if env is None else env
    client = env.get("KAFKA_CLIENT", "").strip().lower() or KAFKA_CLIENTS[0]
    if client not in KAFKA_CLIENTS:
        raise ConfigurationError(f"KAFKA_CLIENT must be 'aiokafka' or 'confluent', not {client!r}")
    return client


def _confluent_transport(env: Mapping[str, str]) -> Transport:
    try:
        from framework.bus.confluent import ConfluentSettings, ConfluentTransport
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            "KAFKA_CLIENT=confluent needs confluent-kafka: "
            'pip install "msa-framework[kafka-confluent]"'
        ) from exc
    return ConfluentTransport(ConfluentSettings.from_env(environ=env))
