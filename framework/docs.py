"""AsyncAPI 3.0 and OpenAPI 3.1 documents generated from a service's declarations.

`asyncapi(service_class)` describes every topic the service consumes (`@handles`: receive
operations) and publishes (`Service.publishes`: send operations), each message with its
CloudEvents type, the binary-mode `ce_*` headers, the Kafka key, and the JSON Schema of its
payload (`framework.messages.json_schema`: pydantic's, or msgspec's for a `msgspec.Struct`).
`openapi(service_class)` describes its `@route`s plus the built-in `/alive`, `/ready` and
`/metrics`. `msa asyncapi module:Service` prints the first; every service serves both at
`/docs/asyncapi.json` and `/docs/openapi.json`.

Both read only what `DocumentedService` names, which `framework.service.Service` provides; this
module does not import the service module (which serves these documents through
`framework.http`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from framework.messages import json_schema, type_name
from framework.types import HandlerInfo, RouteInfo
from framework.version import __version__

__all__ = ["DocumentedService", "asyncapi", "openapi"]


class DocumentedService(Protocol):
    """What the documents read of a service class (a `framework.service.Service` subclass)."""

    name: ClassVar[str]
    publishes: ClassVar[Mapping[str, Sequence[type]]]
    __msa_handlers__: ClassVar[tuple[HandlerInfo, ...]]
    __msa_routes__: ClassVar[tuple[RouteInfo, ...]]


_REF = "#/components/schemas/{model}"
_CE_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": ["ce_specversion", "ce_id", "ce_source", "ce_type"],
    "properties": {
        "ce_specversion": {"type": "string", "const": "1.0"},
        "ce_id": {"type": "string"},
        "ce_source": {"type": "string"},
        "ce_type": {"type": "string"},
        "ce_time": {"type": "string", "format": "date-time"},
        "ce_subject": {"type": "string"},
        "content-type": {"type": "string", "default": "application/json"},
        "ce_correlationid": {"type": "string"},
        "ce_causationid": {"type": "string"},
        "ce_traceparent": {"type": "string", "description": "W3C trace context"},
        "ce_partitionkey": {"type": "string"},
        "ce_replyto": {"type": "string", "description": "reply topic of a request"},
    },
}


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def _schema(payload: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """The payload's JSON Schema (pydantic's, or msgspec's for a `msgspec.Struct`), with nested
    definitions hoisted into components/schemas."""
    schema = json_schema(payload, ref_template=_REF)
    schemas.update(schema.pop("$defs", {}))
    return schema


def asyncapi(service: type[DocumentedService] | DocumentedService) -> dict[str, Any]:
    cls = service if isinstance(service, type) else type(service)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}

    def message_ref(payload: Any, event_type: str) -> dict[str, str]:
        name = _ident(event_type)
        if name not in messages:
            messages[name] = {
                "name": event_type,
                "title": getattr(payload, "__name__", event_type),
                "contentType": "application/json",
                "headers": _CE_HEADERS,
                "payload": _schema(payload, schemas),
                "bindings": {"kafka": {"key": {"type": "string"}, "bindingVersion": "0.5.0"}},
            }
        return {"$ref": f"#/components/messages/{name}"}

    def channel(topic: str) -> str:
        ident = _ident(topic)
        channels.setdefault(ident, {"address": topic, "messages": {}})
        return ident

    def operation(action: str, topic: str, payload: Any, event_type: str) -> None:
        ident = channel(topic)
        name = _ident(event_type)
        channels[ident]["messages"][name] = message_ref(payload, event_type)
        op_id = f"{action}_{ident}"
        op = operations.setdefault(
            op_id, {"action": action, "channel": {"$ref": f"#/channels/{ident}"}, "messages": []}
        )
        ref = {"$ref": f"#/channels/{ident}/messages/{name}"}
        if ref not in op["messages"]:
            op["messages"].append(ref)

    for info in cls.__msa_handlers__:
        event_type = info.type or type_name(info.payload_type)
        for topic in info.topics:
            operation("receive", topic, info.payload_type, event_type)
    for topic, payloads in cls.publishes.items():
        for payload in payloads:
            operation("send", topic, payload, type_name(payload))

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": cls.name,
            "version": __version__,
            "description": (cls.__doc__ or "").strip(),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def openapi(service: type[DocumentedService] | DocumentedService) -> dict[str, Any]:
    cls = service if isinstance(service, type) else type(service)
    schemas: dict[str, Any] = {}
    problem = {"$ref": "#/components/schemas/Problem"}
    paths: dict[str, Any] = {
        "/alive": {
            "get": {
                "summary": "Liveness: the process serves requests.",
                "responses": {"200": {"description": "alive"}},
            }
        },
        "/ready": {
            "get": {
                "summary": "Readiness: bus and dependencies reachable, not stopping.",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics.",
                "responses": {"200": {"description": "text exposition"}},
            }
        },
    }
    for info in cls.__msa_routes__:
        operation: dict[str, Any] = {
            "operationId": info.attribute,
            "summary": info.summary,
            "responses": {
                "default": {
                    "description": "problem",
                    "content": {"application/problem+json": {"schema": problem}},
                }
            },
        }
        params = re.findall(r"{(\w+)(?::[^}]*)?}", info.path)
        if params:
            operation["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in params
            ]
        if info.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _schema(info.body, schemas)}},
            }
        ok: dict[str, Any] = {"description": "success"}
        if info.response is not None:
            ok["content"] = {"application/json": {"schema": _schema(info.response, schemas)}}
        operation["responses"]["200"] = ok
        path = re.sub(r"{(\w+):[^}]*}", r"{\1}", info.path)
        paths.setdefault(path, {})[info.method.lower()] = operation
    schemas["Problem"] = {
        "type": "object",
        "description": "RFC 9457 problem details",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object"}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": cls.name, "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }
