"""CloudEvents envelopes: binary mode (Kafka binding), structured mode, typed payloads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from pydantic import BaseModel, Field

from framework.errors import ConfigurationError, DecodeError, PayloadValidationError
from framework.messages import (
    Envelope,
    MessageRegistry,
    check_payload_type,
    decode_payload,
    encode_payload,
    from_binary,
    from_structured,
    json_schema,
    message_type,
    to_binary,
    to_structured,
    type_name,
)
from framework.types import Record


@message_type("shop.order.placed")
class OrderPlaced(BaseModel):
    order_id: str
    total: Decimal
    items: list[str] = Field(default_factory=list)


@dataclass
class Plain:
    name: str
    count: int


def record_of(key: bytes | None, value: bytes, headers: tuple[tuple[str, bytes], ...]) -> Record:
    return Record(topic="t", partition=0, offset=5, key=key, value=value, headers=headers)


def test_binary_mode_uses_the_kafka_binding_headers() -> None:
    envelope = Envelope(
        type="shop.order.placed",
        source="orders",
        data=OrderPlaced(order_id="o-1", total=Decimal("12.50"), items=["mug"]),
        subject="orders/o-1",
        correlationid="c-1",
        causationid="x-9",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        partitionkey="o-1",
        time=datetime(2026, 11, 25, 8, 0, 0, 123456, tzinfo=UTC),
        extensions={"replyto": "orders.replies.abc"},
    )
    key, value, headers = to_binary(envelope)
    as_dict = dict(headers)
    assert key == b"o-1"
    assert orjson.loads(value) == {"order_id": "o-1", "total": "12.50", "items": ["mug"]}
    assert as_dict["ce_specversion"] == b"1.0"
    assert as_dict["ce_id"] == envelope.id.encode()
    assert as_dict["ce_type"] == b"shop.order.placed"
    assert as_dict["ce_source"] == b"orders"
    assert as_dict["ce_time"] == b"2026-11-25T08:00:00.123456Z"
    assert as_dict["content-type"] == b"application/json"
    assert as_dict["ce_subject"] == b"orders/o-1"
    assert as_dict["ce_correlationid"] == b"c-1"
    assert as_dict["ce_causationid"] == b"x-9"
    assert as_dict["ce_partitionkey"] == b"o-1"
    assert as_dict["ce_replyto"] == b"orders.replies.abc"

    back = from_binary(record_of(key, value, headers))
    assert back.id == envelope.id
    assert back.time == envelope.time
    assert back.extensions == {"replyto": "orders.replies.abc"}
    assert (back.subject, back.correlationid, back.causationid) == ("orders/o-1", "c-1", "x-9")
    assert decode_payload(back.data, OrderPlaced) == envelope.data


def test_a_foreign_producer_needs_only_the_required_headers() -> None:
    headers = (
        ("ce_specversion", b"1.0"),
        ("ce_id", b"42"),
        ("ce_source", b"legacy-app"),
        ("ce_type", b"shop.order.placed"),
    )
    envelope = from_binary(record_of(b"o-9", b'{"order_id":"o-9","total":1}', headers))
    assert envelope.partitionkey == "o-9", "the record key stands in for the partition key"
    assert decode_payload(envelope.data, OrderPlaced).total == Decimal(1)


@pytest.mark.parametrize(
    ("headers", "complaint"),
    [
        ((), r"missing header\(s\) ce_id, ce_source, ce_type, ce_specversion"),
        (
            (("ce_id", b"1"), ("ce_source", b"s"), ("ce_type", b"t"), ("ce_specversion", b"0.3")),
            "unsupported CloudEvents specversion",
        ),
        (
            (("ce_id", b"1"), ("ce_source", b"s"), ("ce_type", b"t"), ("ce_specversion", b"1.0"),
             ("ce_time", b"yesterday")),
            "not an RFC 3339 timestamp",
        ),
        ((("ce_id", b"\xff"),), "not UTF-8"),
    ],
)  # fmt: skip
def test_records_that_are_not_cloudevents_raise_decode_error(
    headers: tuple[tuple[str, bytes], ...], complaint: str
) -> None:
    with pytest.raises(DecodeError, match=complaint):
        from_binary(record_of(None, b"{}", headers))


def test_structured_mode_round_trip_is_cloudevents_json() -> None:
    envelope = Envelope(type="plain", source="s", data=Plain(name="a", count=2), subject="x")
    raw = to_structured(envelope)
    event = json.loads(raw)
    assert event["specversion"] == "1.0"
    assert event["data"] == {"name": "a", "count": 2}
    assert event["subject"] == "x"
    back = from_structured(raw)
    assert back.id == envelope.id
    assert decode_payload(back.data, Plain) == Plain(name="a", count=2)
    with pytest.raises(DecodeError, match="missing attribute"):
        from_structured(b'{"id": "1"}')
    with pytest.raises(DecodeError, match="not JSON"):
        from_structured(b"{nope")


def test_invalid_payloads_raise_a_typed_error_with_the_fields() -> None:
    with pytest.raises(PayloadValidationError) as error:
        decode_payload(b'{"order_id": 5, "total": "lots"}', OrderPlaced)
    assert [e["loc"] for e in error.value.errors] == [["order_id"], ["total"]]
    assert "order_id" in str(error.value)
    assert isinstance(error.value, ValueError)
    with pytest.raises(PayloadValidationError):
        decode_payload(b"not json at all", Plain)


@dataclass
class Priced:
    sku: str
    price: Decimal


def test_a_dataclass_with_a_decimal_encodes_it_as_a_string_as_pydantic_does() -> None:
    raw = encode_payload(Priced("mug", Decimal("12.50")))
    assert orjson.loads(raw) == {"sku": "mug", "price": "12.50"}
    assert decode_payload(raw, Priced) == Priced("mug", Decimal("12.50"))


def test_a_type_no_library_can_validate_is_a_configuration_error() -> None:
    class Opaque:
        pass

    with pytest.raises(ConfigurationError, match=r"'.*Opaque' is not a payload type"):
        check_payload_type(Opaque)
    with pytest.raises(ConfigurationError):
        decode_payload(b"{}", Opaque)
    check_payload_type(Plain)
    check_payload_type(OrderPlaced)


def test_type_names_schemas_and_registry() -> None:
    assert type_name(OrderPlaced) == "shop.order.placed"
    assert type_name(Plain) == "Plain"
    assert json_schema(OrderPlaced)["properties"]["order_id"]["type"] == "string"
    registry = MessageRegistry()
    registry.register(OrderPlaced)
    assert registry.resolve("shop.order.placed") is OrderPlaced
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(Plain, "shop.order.placed")


def test_caused_envelopes_carry_correlation_and_causation() -> None:
    first = Envelope(type="a", source="s", data={"n": 1})
    second = first.caused("b", "t", {"n": 2})
    third = second.caused("c", "u", {"n": 3})
    assert second.correlationid == first.id
    assert second.causationid == first.id
    assert third.correlationid == first.id
    assert third.causationid == second.id
    assert encode_payload(b"raw") == b"raw"
