"""`msgspec.Struct` payloads in service declarations: `@handles` annotations, and the AsyncAPI and
OpenAPI documents."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import msgspec
import pytest
from aiohttp import web

from framework.docs import asyncapi, openapi
from framework.errors import ConfigurationError
from framework.messages import message_type
from framework.service import Service, handles, route


class Line(msgspec.Struct):
    sku: str
    quantity: int


@message_type("test.msgspec.docs.order")
class Order(msgspec.Struct, kw_only=True):
    order_id: str
    lines: list[Line]
    note: str | None = None


@message_type("test.msgspec.docs.accepted")
class Accepted(msgspec.Struct):
    order_id: str


class Unsupported:
    """Neither a model, a dataclass nor a Struct: no library can validate it."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id


class Wrapper(msgspec.Struct):
    inner: Unsupported


class Orders(Service):
    """Takes orders."""

    name = "msgspec-docs"
    publishes: ClassVar[Mapping[str, Sequence[type]]] = {"accepted": [Accepted]}

    @handles("orders")
    async def on_order(self, order: Order) -> None:
        return None

    @route("POST", "/orders", body=Order, response=Accepted)
    async def post_order(self, request: web.Request) -> web.Response:
        return web.Response()


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_a_struct_annotation_declares_the_handler_of_its_type() -> None:
    [info] = Orders.__msa_handlers__
    assert info.payload_type is Order
    assert info.topics == ("orders",)


def test_a_handler_annotated_with_an_unsupported_type_is_refused_at_declaration() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"Refused\.on_thing: the payload parameter 'thing': 'Unsupported' is not a payload",
    ):

        class Refused(Service):
            @handles("things")
            async def on_thing(self, thing: Unsupported) -> None:
                return None


def test_a_struct_with_an_unsupported_field_is_refused_at_declaration() -> None:
    with pytest.raises(ConfigurationError, match="'Wrapper' is not a payload type"):

        class Refused(Service):
            @handles("things")
            async def on_wrapper(self, wrapper: Wrapper) -> None:
                return None


def test_asyncapi_describes_struct_payloads_with_their_fields() -> None:
    document = asyncapi(Orders)
    messages = document["components"]["messages"]

    received = messages["test_msgspec_docs_order"]
    assert received["name"] == "test.msgspec.docs.order"
    payload = received["payload"]
    assert set(payload["properties"]) == {"order_id", "lines", "note"}
    assert set(payload["required"]) == {"order_id", "lines"}
    line = resolve(document, payload["properties"]["lines"]["items"]["$ref"])
    assert line["properties"] == {"sku": {"type": "string"}, "quantity": {"type": "integer"}}

    sent = messages["test_msgspec_docs_accepted"]["payload"]
    assert sent["properties"] == {"order_id": {"type": "string"}}
    actions = {op["action"] for op in document["operations"].values()}
    assert actions == {"receive", "send"}


def test_openapi_describes_struct_bodies() -> None:
    document = openapi(Orders)
    post = document["paths"]["/orders"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"order_id", "lines", "note"}
    assert "Line" in document["components"]["schemas"]
    answer = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["required"] == ["order_id"]
