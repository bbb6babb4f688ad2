"""msa-framework: an asynchronous, event-driven microservice framework for Python.

Services talk through events on a message bus (in-memory or Apache Kafka) and through HTTP, keep
exactly-once effects with a transactional outbox and an idempotent inbox, coordinate with sagas,
and sit behind an aiohttp API gateway.

    from framework import Service, handles, message_type

The names below are the public API; integrations that need an optional dependency are imported
from their own modules (`framework.bus.kafka` needs `msa-framework[kafka]`), and also resolve
lazily here with an install hint when the extra is missing.
"""

from typing import Any

from framework.bus import (
    Bus,
    ConsumerOptions,
    HandlerSpec,
    MemoryTransport,
    Message,
    Outgoing,
    RetryPolicy,
    Subscription,
)
from framework.errors import (
    BusError,
    CommitError,
    ConfigurationError,
    DatabaseUnavailable,
    DecodeError,
    FeedClosed,
    HandlerSignal,
    MessageError,
    MsaError,
    NotStartedError,
    PayloadValidationError,
    PersistenceError,
    PublishError,
    Reject,
    RemoteError,
    RequestTimeout,
    RetryLater,
    SignatureError,
    TopicError,
    TranslationError,
    TransportError,
    UnknownMessageType,
    UnsafeInputError,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from framework.messages import Envelope, message_type, type_name
from framework.service import Resource, Service, ServiceSettings, handles, route
from framework.types import Record, RecordMetadata, TopicPartition, TopicSpec, Transport
from framework.version import __version__

_LAZY = {
    "KafkaTransport": ("framework.bus.kafka", "kafka"),
    "KafkaSettings": ("framework.bus.kafka", "kafka"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, extra = _LAZY[name]
        try:
            module = __import__(module_name, fromlist=[name])
        except ImportError as exc:
            raise ImportError(
                f"framework.{name} needs an optional dependency: "
                f'pip install "msa-framework[{extra}]"'
            ) from exc
        return getattr(module, name)
    raise AttributeError(f"module 'framework' has no attribute {name!r}")


__all__ = [
    "Bus",
    "BusError",
    "CommitError",
    "ConfigurationError",
    "ConsumerOptions",
    "DatabaseUnavailable",
    "DecodeError",
    "Envelope",
    "FeedClosed",
    "HandlerSignal",
    "HandlerSpec",
    "KafkaSettings",
    "KafkaTransport",
    "MemoryTransport",
    "Message",
    "MessageError",
    "MsaError",
    "NotStartedError",
    "Outgoing",
    "PayloadValidationError",
    "PersistenceError",
    "PublishError",
    "Record",
    "RecordMetadata",
    "Reject",
    "RemoteError",
    "RequestTimeout",
    "Resource",
    "RetryLater",
    "RetryPolicy",
    "Service",
    "ServiceSettings",
    "SignatureError",
    "Subscription",
    "TopicError",
    "TopicPartition",
    "TopicSpec",
    "TranslationError",
    "Transport",
    "TransportError",
    "UnknownMessageType",
    "UnsafeInputError",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamUnreachable",
    "__version__",
    "handles",
    "message_type",
    "route",
    "type_name",
]
