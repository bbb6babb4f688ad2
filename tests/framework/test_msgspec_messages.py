"""`msgspec.Struct` payloads in the codec layer: encode, decode, validation errors, JSON Schema,
and the framework without msgspec."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import orjson
import pytest

from framework.errors import ConfigurationError, PayloadValidationError
from framework.messages import (
    Envelope,
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
    validate_payload,
)
from framework.types import Record


class OrderLine(msgspec.Struct, frozen=True):
    sku: str
    quantity: int


@message_type("test.msgspec.order.placed")
class OrderPlaced(msgspec.Struct, kw_only=True):
    order_id: str
    lines: list[OrderLine]
    total: Decimal
    placed_at: datetime
    note: str | None = None


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class Tree(msgspec.Struct):
    label: str
    children: list[Tree] = []


class NotAPayload:
    def __init__(self, anything: object) -> None:
        self.anything = anything


ORDER = OrderPlaced(
    order_id="o-1",
    lines=[OrderLine("mug", 2), OrderLine("tea", 1)],
    total=Decimal("12.50"),
    placed_at=datetime(2026, 11, 25, 8, 0, tzinfo=UTC),
)
ORDER_JSON = {
    "order_id": "o-1",
    "lines": [{"sku": "mug", "quantity": 2}, {"sku": "tea", "quantity": 1}],
    "total": "12.50",
    "placed_at": "2026-11-25T08:00:00Z",
    "note": None,
}


def invalid(raw: bytes, cls: type[object] = OrderPlaced) -> PayloadValidationError:
    with pytest.raises(PayloadValidationError) as caught:
        decode_payload(raw, cls)
    return caught.value


def test_a_struct_encodes_to_plain_json_and_decodes_to_an_equal_struct() -> None:
    raw = encode_payload(ORDER)
    assert orjson.loads(raw) == ORDER_JSON
    back = decode_payload(raw, OrderPlaced)
    assert type(back) is OrderPlaced
    assert type(back.lines[0]) is OrderLine
    assert back == ORDER
    assert type_name(OrderPlaced) == "test.msgspec.order.placed"


def test_a_struct_inside_plain_values_encodes_too() -> None:
    raw = encode_payload({"orders": [ORDER], "count": 1})
    assert orjson.loads(raw) == {"orders": [ORDER_JSON], "count": 1}


def test_a_wrong_typed_field_names_its_place() -> None:
    document = {**ORDER_JSON, "lines": [{"sku": "mug", "quantity": "two"}]}
    error = invalid(orjson.dumps(document))
    assert str(error) == (
        "payload is not a valid test.msgspec.order.placed: 1 error(s): "
        "lines.0.quantity: Expected `int`, got `str`"
    )
    assert error.errors == [
        {"loc": ["lines", 0, "quantity"], "msg": "Expected `int`, got `str`", "type": "value_error"}
    ]


def test_a_missing_and_an_unknown_field_are_named() -> None:
    document = {k: v for k, v in ORDER_JSON.items() if k != "total"}
    [missing] = invalid(orjson.dumps(document)).errors
    assert missing["loc"] == ["total"]
    assert missing["type"] == "missing"

    [unknown] = invalid(b'{"name": "x", "colour": "red"}', Strict).errors
    assert unknown["loc"] == ["colour"]
    assert unknown["type"] == "extra_forbidden"


def test_bytes_that_are_not_json_are_a_validation_error() -> None:
    error = invalid(b'{"order_id": ')
    [entry] = error.errors
    assert entry["type"] == "json_invalid"
    assert entry["loc"] == []
    assert "<root>: Invalid JSON" in str(error)


def test_json_decoding_is_strict_and_parsed_values_convert_as_pydantic_lax_mode_would() -> None:
    # A form or XML body has strings everywhere; JSON on the bus has real numbers.
    form = {**ORDER_JSON, "lines": [{"sku": "mug", "quantity": "2"}]}
    assert validate_payload(form, OrderPlaced).lines == [OrderLine("mug", 2)]
    assert invalid(orjson.dumps(form)).errors[0]["loc"] == ["lines", 0, "quantity"]
    with pytest.raises(PayloadValidationError, match=r"lines\.0\.quantity"):
        validate_payload({**ORDER_JSON, "lines": [{"sku": "mug", "quantity": "lots"}]}, OrderPlaced)


def test_a_type_pydantic_cannot_take_but_msgspec_can_is_decoded_by_msgspec() -> None:
    assert decode_payload(b'[{"sku": "mug", "quantity": 1}]', list[OrderLine]) == [
        OrderLine("mug", 1)
    ]

    @dataclass
    class Basket:
        lines: list[OrderLine]

    assert decode_payload(b'{"lines": [{"sku": "a", "quantity": 3}]}', Basket) == Basket(
        [OrderLine("a", 3)]
    )


def test_a_type_no_library_can_take_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'NotAPayload' is not a payload type"):
        check_payload_type(NotAPayload)
    with pytest.raises(ConfigurationError, match=r"msgspec\.Struct"):
        decode_payload(b"{}", NotAPayload)
    check_payload_type(OrderPlaced)
    check_payload_type(list[OrderLine])


def test_binary_and_structured_modes_carry_a_struct() -> None:
    envelope = Envelope(
        type=type_name(OrderPlaced), source="orders", data=ORDER, partitionkey="o-1"
    )
    key, value, headers = to_binary(envelope)
    record = Record(topic="t", partition=0, offset=0, key=key, value=value, headers=headers)
    back = from_binary(record)
    assert back.type == "test.msgspec.order.placed"
    assert decode_payload(back.data, OrderPlaced) == ORDER

    event = orjson.loads(to_structured(envelope))
    assert event["data"] == ORDER_JSON
    assert decode_payload(from_structured(to_structured(envelope)).data, OrderPlaced) == ORDER


def test_the_json_schema_of_a_struct_lists_its_fields_with_nested_types_in_defs() -> None:
    schema = json_schema(OrderPlaced)
    assert schema["title"] == "OrderPlaced"
    assert set(schema["properties"]) == {"order_id", "lines", "total", "placed_at", "note"}
    assert set(schema["required"]) == {"order_id", "lines", "total", "placed_at"}
    assert schema["properties"]["lines"]["items"] == {"$ref": "#/$defs/OrderLine"}
    assert schema["$defs"]["OrderLine"]["properties"]["quantity"] == {"type": "integer"}
    assert "OrderPlaced" not in schema["$defs"]

    custom = json_schema(OrderPlaced, ref_template="#/components/schemas/{model}")
    assert custom["properties"]["lines"]["items"] == {"$ref": "#/components/schemas/OrderLine"}


def test_a_recursive_struct_stays_a_reference() -> None:
    schema = json_schema(Tree)
    assert schema["$ref"] == "#/$defs/Tree"
    assert schema["$defs"]["Tree"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Tree"}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_framework_never_imports_msgspec_itself() -> None:
    done = run_python(
        """
        import importlib, pkgutil, sys
        import framework
        for module in pkgutil.walk_packages(framework.__path__, "framework."):
            importlib.import_module(module.name)
        assert "msgspec" not in sys.modules, "the framework imported msgspec"
        """
    )
    assert done.returncode == 0, done.stderr


def test_the_framework_works_without_msgspec_installed() -> None:
    done = run_python(
        """
        import asyncio, sys
        from dataclasses import dataclass
        sys.modules["msgspec"] = None  # `import msgspec` now fails, as when it is not installed
        from pydantic import BaseModel
        from framework import MemoryTransport, Service, ServiceSettings, handles, message_type
        from framework.docs import asyncapi
        from framework.errors import ConfigurationError, PayloadValidationError
        from framework.messages import decode_payload, encode_payload
        from framework.testing import ServiceHarness

        @message_type("test.nomsgspec.ping")
        @dataclass
        class Ping:
            n: int

        class Pong(BaseModel):
            n: int

        assert decode_payload(encode_payload(Ping(1)), Ping) == Ping(1)
        assert decode_payload(encode_payload(Pong(n=2)), Pong) == Pong(n=2)
        try:
            decode_payload(b'{"n": "x"}', Ping)
        except PayloadValidationError as exc:
            assert exc.errors[0]["loc"] == ["n"], exc.errors
        else:
            raise AssertionError("validated")
        try:
            decode_payload(b"{}", type("Odd", (), {}))
        except ConfigurationError as exc:
            assert "is not a payload type" in str(exc)
        else:
            raise AssertionError("an unsupported type passed")

        class Pinger(Service):
            @handles("pings")
            async def on_ping(self, ping: Ping) -> None:
                return None

        assert "pings" in str(asyncapi(Pinger))

        async def main() -> None:
            service = Pinger(ServiceSettings(http_port=-1), transport=MemoryTransport())
            async with ServiceHarness(service) as harness:
                await harness.publish("pings", Ping(3))
                [handled] = await harness.handled(Ping)
                assert handled.message.data == Ping(3)

        asyncio.run(main())
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
