"""The public API is explicit: this list changes only on purpose."""

import framework

EXPECTED = {
    "Bus", "BusError", "CommitError", "ConfigurationError", "ConsumerOptions", "DecodeError",
    "Envelope", "HandlerSignal", "HandlerSpec", "KafkaSettings", "KafkaTransport",
    "MemoryTransport", "Message", "MessageError", "MsaError", "NotStartedError", "Outgoing",
    "PayloadValidationError", "PersistenceError", "PublishError", "Record", "RecordMetadata",
    "Reject", "RemoteError", "RequestTimeout", "Resource", "RetryLater", "RetryPolicy", "Service",
    "ServiceSettings", "Subscription", "TopicError", "TopicPartition", "TopicSpec", "Transport",
    "TranslationError", "TransportError", "UnknownMessageType", "UnsafeInputError",
    "UnsupportedMediaType", "__version__", "handles", "message_type", "route",
    "type_name",
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
    assert issubclass(framework.RequestTimeout, TimeoutError)
    assert not issubclass(framework.RetryLater, framework.MsaError), "signals are not errors"


def test_the_translate_package_exports_its_pieces() -> None:
    import framework.translate as translate

    for name in translate.__all__:
        assert getattr(translate, name) is not None, name
    assert {"AcceptedPublish", "RequestReply", "QueueAndDrain", "SseBridge", "WebSocketBridge",
            "FieldMapping", "XmlCodec", "EventFeed"} <= set(translate.__all__)  # fmt: skip
