"""CloudEvents 1.0 envelopes, typed payloads, and their wire encodings.

An `Envelope` carries the CloudEvents context attributes (`id`, `source`, `type`, `specversion`,
`time`, `subject`, `datacontenttype`), the extensions this framework relies on (`correlationid`,
`causationid`, `traceparent`, `partitionkey`) and the `data`.

On Kafka (and the in-memory bus) envelopes travel in the CloudEvents Kafka binding's *binary*
content mode: every attribute is a `ce_<name>` header, `datacontenttype` is the `content-type`
header, the record value is the payload alone (orjson-encoded JSON) and the record key is the
partition key. Any Kafka client can therefore read and write our events without this library:

    headers: ce_specversion=1.0, ce_id=..., ce_source=orders, ce_type=shop.order.placed,
             ce_time=2026-11-25T08:00:00.000000Z, content-type=application/json, ...
    key:     b"order-17"
    value:   b'{"order_id":"order-17","total":"12.50"}'

Payload types are pydantic v2 models or dataclasses (or anything a pydantic `TypeAdapter`
accepts). A type's CloudEvents `type` is set with `@message_type("shop.order.placed")`, else it is
the class name. Incoming data is validated against the registered type; a mismatch raises
`PayloadValidationError`, which the bus sends to the dead-letter topic.

Encoding: orjson for everything except pydantic models, which use pydantic-core's own Rust JSON
serializer (it honours field serializers and aliases, which orjson cannot see, and is as fast).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from framework.errors import DecodeError, PayloadValidationError, UnknownMessageType
from framework.types import Headers, Record

__all__ = [
    "CE_PREFIX",
    "Envelope",
    "MessageRegistry",
    "decode_payload",
    "encode_payload",
    "from_binary",
    "from_structured",
    "json_schema",
    "message_type",
    "new_id",
    "to_binary",
    "to_structured",
    "type_name",
    "validate_payload",
]

T = TypeVar("T")
C = TypeVar("C", bound=type)

CE_PREFIX = "ce_"
CONTENT_TYPE = "content-type"
JSON = "application/json"
_CORE = ("id", "source", "type", "specversion", "time", "subject")
_KNOWN_EXTENSIONS = ("correlationid", "causationid", "traceparent", "partitionkey")
_STANDARD = frozenset((*_CORE, *_KNOWN_EXTENSIONS))


def new_id() -> str:
    """A random 128-bit id as 32 hex digits (cheaper than uuid4 and as unique)."""
    return os.urandom(16).hex()


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True, kw_only=True)
class Envelope(Generic[T]):
    """A CloudEvent: context attributes plus `data`.

    `extensions` holds any other CloudEvents extension attributes (lower-case names, string
    values), e.g. the `replyto` topic of a request.
    """

    type: str
    source: str
    data: T
    id: str = field(default_factory=new_id)
    time: datetime = field(default_factory=utc_now)
    subject: str | None = None
    datacontenttype: str = JSON
    specversion: str = "1.0"
    correlationid: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    partitionkey: str | None = None
    extensions: dict[str, str] = field(default_factory=dict)

    def caused(self, type: str, source: str, data: T, **attributes: Any) -> Envelope[T]:
        """An envelope caused by this one: same correlation id, causation id = this id."""
        return Envelope(
            type=type,
            source=source,
            data=data,
            correlationid=self.correlationid or self.id,
            causationid=self.id,
            traceparent=self.traceparent,
            **attributes,
        )


# -- payload types ---------------------------------------------------------------------------


def message_type(name: str) -> Callable[[C], C]:
    """Class decorator: the CloudEvents `type` of a payload class.

    >>> @message_type("shop.order.placed")
    ... @dataclass
    ... class OrderPlaced:
    ...     order_id: str
    """

    def mark(cls: C) -> C:
        cls.__msa_type__ = name  # type: ignore[attr-defined]
        _DECLARED.add(name)
        return cls

    return mark


_DECLARED: set[str] = set()


def is_declared(name: str) -> bool:
    """Whether some class in this process declared CloudEvents type `name` with
    `@message_type` (a handler for a type nothing declares usually has the wrong annotation)."""
    return name in _DECLARED


def type_name(cls: type[Any]) -> str:
    """The CloudEvents `type` of a payload class."""
    name = getattr(cls, "__msa_type__", None)
    return name if isinstance(name, str) else cls.__name__


@functools.lru_cache(maxsize=1024)
def _adapter(cls: Any) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


def json_schema(cls: Any) -> dict[str, Any]:
    """The JSON Schema of a payload type (for AsyncAPI/OpenAPI documents)."""
    return _adapter(cls).json_schema()


def _orjson_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode_payload(data: Any) -> bytes:
    """The JSON bytes of a payload (a model, a dataclass, or plain JSON-able values)."""
    if isinstance(data, BaseModel):
        return data.__pydantic_serializer__.to_json(data)
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return orjson.dumps(data, default=_orjson_default)


def decode_payload(raw: bytes, cls: type[T]) -> T:
    """Parse and validate JSON bytes as `cls`; `PayloadValidationError` says what is wrong."""
    try:
        return cast(T, _adapter(cast(Any, cls)).validate_json(raw))
    except ValidationError as exc:
        raise _validation_error(exc, cls) from None


def validate_payload(value: Any, cls: type[T]) -> T:
    """Validate an already-parsed value (e.g. a decoded XML or form body) as `cls`."""
    try:
        return cast(T, _adapter(cast(Any, cls)).validate_python(value))
    except ValidationError as exc:
        raise _validation_error(exc, cls) from None


def _validation_error(exc: ValidationError, cls: Any) -> PayloadValidationError:
    errors: list[dict[str, Any]] = [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
    ]
    return PayloadValidationError(
        f"payload is not a valid {type_name(cls)}: {exc.error_count()} error(s): "
        + "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in errors),
        errors=errors,
    )


class MessageRegistry:
    """CloudEvents `type` -> payload class, for decoding incoming events to typed data."""

    def __init__(self) -> None:
        self._types: dict[str, type[Any]] = {}

    def register(self, cls: type[Any], name: str | None = None) -> str:
        name = name or type_name(cls)
        known = self._types.get(name)
        if known is not None and known is not cls:
            from framework.errors import ConfigurationError

            raise ConfigurationError(
                f"message type {name!r} is registered twice: {known.__qualname__} "
                f"and {cls.__qualname__}"
            )
        self._types[name] = cls
        return name

    def get(self, name: str) -> type[Any] | None:
        return self._types.get(name)

    def resolve(self, name: str) -> type[Any]:
        cls = self._types.get(name)
        if cls is None:
            raise UnknownMessageType(f"no payload type registered for CloudEvents type {name!r}")
        return cls

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def items(self) -> list[tuple[str, type[Any]]]:
        return list(self._types.items())


# -- binary content mode (Kafka, in-memory bus) -----------------------------------------------


def _format_time(value: datetime) -> bytes:
    """RFC 3339 in UTC with microseconds and `Z` (bytes %-formatting: half isoformat's cost)."""
    if value.tzinfo is not UTC:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return b"%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def to_binary(envelope: Envelope[Any]) -> tuple[bytes | None, bytes, Headers]:
    """Record key, value and headers of an envelope in the Kafka binding's binary mode."""
    headers: list[tuple[str, bytes]] = [
        ("ce_specversion", envelope.specversion.encode()),
        ("ce_id", envelope.id.encode()),
        ("ce_source", envelope.source.encode()),
        ("ce_type", envelope.type.encode()),
        ("ce_time", _format_time(envelope.time)),
        (CONTENT_TYPE, envelope.datacontenttype.encode()),
    ]
    append = headers.append
    if envelope.subject is not None:
        append(("ce_subject", envelope.subject.encode()))
    if envelope.correlationid is not None:
        append(("ce_correlationid", envelope.correlationid.encode()))
    if envelope.causationid is not None:
        append(("ce_causationid", envelope.causationid.encode()))
    if envelope.traceparent is not None:
        append(("ce_traceparent", envelope.traceparent.encode()))
    key = None
    if envelope.partitionkey is not None:
        key = envelope.partitionkey.encode()
        append(("ce_partitionkey", key))
    if envelope.extensions:
        for name, value in envelope.extensions.items():
            append((CE_PREFIX + name, value.encode()))
    return key, encode_payload(envelope.data), tuple(headers)


def _parse_time(raw: str) -> datetime:
    try:
        return datetime.fromisoformat(raw)
    except ValueError as exc:
        raise DecodeError(f"ce_time {raw!r} is not an RFC 3339 timestamp") from exc


def from_binary(record: Record) -> Envelope[bytes]:
    """The envelope of a binary-mode record; `data` stays raw bytes until typed decoding."""
    content_type = JSON
    attributes: dict[str, str] = {}
    try:
        for name, value in record.headers:
            if name[:3] == CE_PREFIX:
                attributes[name[3:]] = value.decode()
            elif name == CONTENT_TYPE:
                content_type = value.decode()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"a CloudEvents header is not UTF-8: {exc}") from exc
    get = attributes.get
    event_id, source, event_type, specversion = (
        get("id"),
        get("source"),
        get("type"),
        get("specversion"),
    )
    if event_id is None or source is None or event_type is None or specversion is None:
        missing = [a for a in ("id", "source", "type", "specversion") if a not in attributes]
        raise DecodeError(
            f"record {record.topic}[{record.partition}]@{record.offset} is not a CloudEvent: "
            f"missing header(s) {', '.join(CE_PREFIX + m for m in missing)}"
        )
    if specversion != "1.0":
        raise DecodeError(f"unsupported CloudEvents specversion {specversion!r}")
    time = get("time")
    partitionkey = get("partitionkey")
    if partitionkey is None and record.key is not None:
        partitionkey = record.key.decode(errors="replace")
    extensions = (
        {k: v for k, v in attributes.items() if k not in _STANDARD}
        if len(attributes) > len(_STANDARD.intersection(attributes))
        else {}
    )
    return Envelope(
        id=event_id,
        source=source,
        type=event_type,
        specversion="1.0",
        time=_parse_time(time) if time is not None else utc_now(),
        subject=get("subject"),
        datacontenttype=content_type,
        correlationid=get("correlationid"),
        causationid=get("causationid"),
        traceparent=get("traceparent"),
        partitionkey=partitionkey,
        extensions=extensions,
        data=record.value,
    )


# -- structured content mode (HTTP bodies, logs, dead-letter inspection) ------------------------


def to_structured(envelope: Envelope[Any]) -> bytes:
    """The whole event as one JSON object (CloudEvents JSON format)."""
    event: dict[str, Any] = {
        "specversion": envelope.specversion,
        "id": envelope.id,
        "source": envelope.source,
        "type": envelope.type,
        "time": _format_time(envelope.time).decode(),
        "datacontenttype": envelope.datacontenttype,
    }
    if envelope.subject is not None:
        event["subject"] = envelope.subject
    for name in _KNOWN_EXTENSIONS:
        value = getattr(envelope, name)
        if value is not None:
            event[name] = value
    event.update(envelope.extensions)
    data = envelope.data
    event["data"] = orjson.Fragment(data if isinstance(data, bytes) else encode_payload(data))
    return orjson.dumps(event)


def from_structured(raw: bytes) -> Envelope[bytes]:
    """Parse a CloudEvents JSON object; `data` is returned as its JSON bytes."""
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise DecodeError("a structured CloudEvent must be a JSON object")
    missing = [a for a in ("id", "source", "type", "specversion") if a not in event]
    if missing:
        raise DecodeError(f"not a CloudEvent: missing attribute(s) {', '.join(missing)}")
    if event["specversion"] != "1.0":
        raise DecodeError(f"unsupported CloudEvents specversion {event['specversion']!r}")
    known = {*_CORE, *_KNOWN_EXTENSIONS, "datacontenttype", "data", "data_base64"}
    time = event.get("time")
    return Envelope(
        id=str(event["id"]),
        source=str(event["source"]),
        type=str(event["type"]),
        time=_parse_time(str(time)) if time is not None else utc_now(),
        subject=event.get("subject"),
        datacontenttype=event.get("datacontenttype", JSON),
        correlationid=event.get("correlationid"),
        causationid=event.get("causationid"),
        traceparent=event.get("traceparent"),
        partitionkey=event.get("partitionkey"),
        extensions={k: str(v) for k, v in event.items() if k not in known},
        data=orjson.dumps(event.get("data")),
    )
