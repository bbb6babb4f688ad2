"""The public API is explicit: these lists change only on purpose."""

import importlib

import pytest

import framework
import framework.errors

EXPECTED = {
    "Bus", "BusError", "CommitError", "ConfigurationError", "ConsumerOptions",
    "DatabaseUnavailable", "DecodeError", "Envelope", "FeedClosed", "HandlerSignal", "HandlerSpec",
    "KafkaSettings", "KafkaTransport", "MemoryTransport", "Message", "MessageError", "MsaError",
    "NotStartedError", "Outgoing", "PayloadValidationError", "PersistenceError", "PublishError",
    "Record", "RecordMetadata", "Reject", "RemoteError", "RequestTimeout", "Resource", "RetryLater",
    "RetryPolicy", "Service", "ServiceSettings", "SignatureError", "Subscription", "TopicError",
    "TopicPartition", "TopicSpec", "TranslationError", "Transport", "TransportError",
    "UnknownMessageType", "UnsafeInputError", "UnsupportedMediaType", "UpstreamError",
    "UpstreamTimeout", "UpstreamUnavailable", "UpstreamUnreachable", "__version__", "handles",
    "message_type", "route", "type_name",
}  # fmt: skip

PACKAGES = {
    "framework.bus": {
        "Bus", "BusMetrics", "ConsumerOptions", "HandlerSpec", "MemoryTransport", "Message",
        "Outgoing", "RetryPolicy", "Subscription", "current_message", "transport_from_env",
    },
    "framework.gateway": {
        "ClientIdentity", "Exchange", "Gateway", "GatewayConfig", "GatewayConfigError",
        "GatewayError", "GatewayHandler", "GatewayMiddleware", "RouteConfig", "SignatureError",
        "UpstreamConfig", "load_config", "parse_config", "sign_url", "verify_signed_path",
    },
    "framework.persistence": {
        "SAGAS_COLLECTION", "SAGA_MIGRATIONS", "DatabaseMissing", "DatabaseUnavailable",
        "DocumentChange",
        "DocumentNotFound", "DuplicateKey", "DuplicateSaga", "Inbox", "IndexSpec", "Migration",
        "MigrationError", "MongoInbox", "MongoOutbox", "MongoResource", "MongoSagaStore", "Outbox",
        "Outcome", "PostgresInbox", "PostgresOutbox", "PostgresResource", "PostgresSagaStore",
        "SagaChange", "SagaDefinition", "SagaError", "SagaEvent", "SagaNote", "SagaNotFound",
        "SagaOrchestrator", "SagaState", "SagaStatus", "SagaStore", "SerializationFailure", "Step",
        "StoredSaga", "UniqueViolation",
    },
    "framework.translate": {
        "HTTP_REQUEST_TYPE", "AcceptedPublish", "CodecRegistry", "Constant", "Drop", "EventFeed",
        "EventFilter", "FeedClosed", "FeedEvent", "FeedListener", "FieldMapping", "FieldOperation",
        "Flatten", "FormCodec", "JsonCodec", "Nest", "NotAcceptable", "Pick", "QueueAndDrain",
        "Rename", "RequestFilter", "RequestReply", "SseBridge", "StatusTracker", "Template",
        "TextCodec", "TokenBucket", "WebSocketBridge", "XmlCodec", "convert", "default_registry",
    },
    "framework.resilience": {
        "AdaptiveConfig", "AdaptiveLimit", "Backoff", "BreakerConfig", "BreakerState",
        "CircuitBreaker", "EjectionConfig", "HealthCheckConfig", "RetryConfig", "TokenBucket",
        "UpstreamConfig", "UpstreamPool", "UpstreamResponse",
    },
}  # fmt: skip


def test_exported_names_are_pinned() -> None:
    assert set(framework.__all__) == EXPECTED


def test_every_exported_name_resolves() -> None:
    for name in framework.__all__:
        assert getattr(framework, name) is not None, name


def test_exceptions_share_one_root_and_misuse_is_a_value_error() -> None:
    for name in framework.__all__:
        value = getattr(framework, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, framework.MsaError | framework.HandlerSignal), name
    assert issubclass(framework.ConfigurationError, ValueError)
    assert issubclass(framework.PayloadValidationError, ValueError)
    assert issubclass(framework.SignatureError, ValueError)
    assert issubclass(framework.RequestTimeout, TimeoutError)
    assert issubclass(framework.UpstreamTimeout, TimeoutError)
    assert not issubclass(framework.RetryLater, framework.MsaError), "signals are not errors"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_pins_its_public_names(package: str) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == PACKAGES[package]
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_packages_exceptions_are_framework_errors(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, framework.MsaError), f"{package}.{name}"


def test_errors_keep_their_old_homes() -> None:
    from framework.gateway.signing import SignatureError
    from framework.translate.feed import FeedClosed

    assert SignatureError is framework.errors.SignatureError
    assert FeedClosed is framework.errors.FeedClosed
