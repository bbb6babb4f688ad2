"""The `KAFKA_*` environment variables, read and checked in one place for both Kafka clients.

    options = kafka_options_from_env()                 # os.environ, KAFKA_*
    settings = KafkaSettings(**options)                # what KafkaSettings.from_env does

`KafkaSettings.from_env` (`framework.bus.kafka`, aiokafka) and `ConfluentSettings.from_env`
(`framework.bus.confluent`, librdkafka) both build their settings from `kafka_options_from_env`,
so one environment describes a deployment whichever client `KAFKA_CLIENT` picks, and a missing
or malformed variable gets the same message from both. This module imports neither client, so
either transport module can import it without the other's extra installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from framework.errors import ConfigurationError

__all__ = ["kafka_options_from_env", "malformed_brokers"]


def malformed_brokers(bootstrap: str) -> list[str]:
    """The entries of a `host:port[,host:port]` list that are not host:port (IPv6 in [])."""
    bad = []
    for entry in (e.strip() for e in bootstrap.split(",")):
        host, _, port = entry.rpartition(":")
        if entry and (not host or not port.isdigit() or not 0 < int(port) < 65536):
            bad.append(entry)
    return bad


def kafka_options_from_env(
    prefix: str = "KAFKA_",
    environ: Mapping[str, str] | None = None,
    *,
    ssl_ca_location: bool = False,
) -> dict[str, Any]:
    """The settings keywords from `{prefix}BOOTSTRAP` (required) and, when set,
    `{prefix}CLIENT_ID`, `LINGER_MS`, `COMPRESSION` (`gzip`, `lz4`, `zstd`, `snappy` or `none`),
    `SECURITY_PROTOCOL`, `SASL_MECHANISM`, `SASL_USERNAME` and `SASL_PASSWORD`; with
    `ssl_ca_location`, also `SSL_CA_LOCATION` (a CA bundle file, for librdkafka).
    `environ` defaults to `os.environ`; a blank variable counts as unset.

    Raises `ConfigurationError` naming the variable for a missing or malformed bootstrap list
    and a `LINGER_MS` that is not a whole number. The values' other checks (a known compression,
    protocol or mechanism) are the settings classes' own, when they are built.
    """
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        return env.get(prefix + name, "").strip() or None

    bootstrap = get("BOOTSTRAP")
    if bootstrap is None:
        raise ConfigurationError(
            f"{prefix}BOOTSTRAP is not set: give the Kafka bootstrap servers as "
            f"host:port[,host:port], e.g. {prefix}BOOTSTRAP=127.0.0.1:9092"
        )
    malformed = malformed_brokers(bootstrap)
    if malformed:
        raise ConfigurationError(
            f"{prefix}BOOTSTRAP={bootstrap!r}: {', '.join(map(repr, malformed))} is not "
            "host:port (a port from 1 to 65535); give host:port[,host:port], e.g. "
            f"{prefix}BOOTSTRAP=127.0.0.1:9092"
        )
    options: dict[str, Any] = {"bootstrap_servers": bootstrap}
    if client_id := get("CLIENT_ID"):
        options["client_id"] = client_id
    if linger := get("LINGER_MS"):
        try:
            options["linger_ms"] = int(linger)
        except ValueError:
            raise ConfigurationError(
                f"{prefix}LINGER_MS must be a whole number of milliseconds, not {linger!r}"
            ) from None
    if compression := get("COMPRESSION"):
        options["compression_type"] = None if compression.lower() == "none" else compression
    if protocol := get("SECURITY_PROTOCOL"):
        options["security_protocol"] = protocol.upper()
    if mechanism := get("SASL_MECHANISM"):
        options["sasl_mechanism"] = mechanism.upper()
    options["sasl_plain_username"] = get("SASL_USERNAME")
    options["sasl_plain_password"] = get("SASL_PASSWORD")
    if ssl_ca_location:
        options["ssl_ca_location"] = get("SSL_CA_LOCATION")
    return options
