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

Payload types are pydantic v2 models, dataclasses (or anything a pydantic `TypeAdapter`
accepts) and `msgspec.Struct`s (the `msgspec` extra: `pip install "msa-framework[msgspec]"`):

    @message_type("shop.order.placed")
    class OrderPlaced(msgspec.Struct, kw_only=True):
        order_id: str
        lines: list[OrderLine]
        total: Decimal

A type's CloudEvents `type` is set with `@message_type("shop.order.placed")`, else it is the class
name. Incoming data is validated against the registered type; a mismatch raises
`PayloadValidationError` (for a pydantic type every error, for a Struct the first one msgspec
meets, each with its `loc`), which the bus sends to the dead-letter topic. A type neither library
can take raises `ConfigurationError` (`check_payload_type`), as a handler's annotation does at
declaration.

Codecs, by type: a Struct is decoded, validated and encoded by msgspec in C, and its JSON Schema
comes from `msgspec.json.schema_components`; so is any other type pydantic cannot take and msgspec
can (`list[OrderPlaced]`, a dataclass with a Struct field). msgspec's JSON decoding is strict, as
msgspec defines it (`"3"` is not an `int`); `validate_payload` of already-parsed values (form and
XML bodies, where every value is a string) converts with `strict=False`, as pydantic's lax mode
would. The framework never imports msgspec itself: a Struct exists only once its program
imported msgspec, so the framework looks for it in `sys.modules` and works without it installed.
pydantic models encode with pydantic-core's own Rust JSON serializer (it honours field serializers
and aliases, which orjson cannot see, and is as fast); everything else with orjson.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from time import gmtime, strftime
from time import time as epoch_seconds
from types import ModuleType
from typing import Any, Generic, TypeVar, cast

import orjson
from pydantic import BaseModel, PydanticSchemaGenerationError, TypeAdapter, ValidationError

from framework.errors import (
    ConfigurationError,
    DecodeError,
    PayloadValidationError,
    UnknownMessageType,
)
from framework.types import Headers, Record

__all__ = [
    "CE_PREFIX",
    "Envelope",
    "MessageRegistry",
    "binary_headers",
    "check_payload_type",
    "decode_payload",
    "encode_payload",
    "format_time",
    "from_binary",
    "from_structured",
    "json_schema",
    "message_type",
    "new_id",
    "time_now",
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
_HEADER_ATTRIBUTES = {CE_PREFIX + name: name for name in _STANDARD}
"""Binary-mode header name -> CloudEvents attribute, for the standard ones."""


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


# -- payload codecs: pydantic-core, or msgspec for Structs ------------------------------------


def _loaded_msgspec() -> ModuleType | None:
    """msgspec, if this program imported it (a Struct exists only then); never imports it."""
    return sys.modules.get("msgspec")


def _is_struct(cls: Any) -> bool:
    msgspec = _loaded_msgspec()
    return msgspec is not None and isinstance(cls, type) and issubclass(cls, msgspec.Struct)


@dataclass(frozen=True, slots=True)
class _Codec:
    """How values of one payload type are decoded from JSON, validated and described."""

    decode_json: Callable[[bytes], Any]
    validate_python: Callable[[Any], Any]
    json_schema: Callable[[str], dict[str, Any]]
    """The JSON Schema, given the `$ref` template (pydantic's: `{model}` is the name)."""


_CACHED_TYPES = 1024
"""How many payload types the codec and encoder caches hold (a program has a few dozen; classes
made on the fly, as tests do, must not grow them forever)."""
_CODECS: dict[Any, _Codec] = {}


def _codec(cls: Any) -> _Codec:
    codec = _CODECS.get(cls)
    if codec is None:
        codec = _new_codec(cls)
        if len(_CODECS) < _CACHED_TYPES:
            _CODECS[cls] = codec
    return codec


def _new_codec(cls: Any) -> _Codec:
    refused: Exception | None = None
    if not _is_struct(cls):
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(cls)
        except PydanticSchemaGenerationError as exc:
            refused = exc  # msgspec may take it: `list[SomeStruct]`, a dataclass with a Struct
        else:
            return _Codec(
                decode_json=adapter.validate_json,
                validate_python=adapter.validate_python,
                json_schema=lambda ref_template: adapter.json_schema(ref_template=ref_template),
            )
    if _loaded_msgspec() is not None:
        try:
            return _msgspec_codec(cls)
        except TypeError as exc:
            refused = exc
    name = repr(cls.__qualname__) if isinstance(cls, type) else repr(cls)
    raise ConfigurationError(
        f"{name} is not a payload type: use a pydantic model, a dataclass, a msgspec.Struct, "
        "or another type pydantic or msgspec can validate"
    ) from refused


def _msgspec_codec(cls: Any) -> _Codec:
    """msgspec's codec of `cls`; TypeError unless msgspec takes it natively (its decoder takes
    any class, as a custom type to decode with a hook; its JSON Schema does not)."""
    import msgspec

    msgspec.json.schema_components((cls,))
    return _Codec(
        decode_json=msgspec.json.Decoder(cls).decode,
        validate_python=functools.partial(msgspec.convert, type=cls, strict=False),
        json_schema=functools.partial(_msgspec_schema, cls),
    )


def _msgspec_schema(cls: Any, ref_template: str) -> dict[str, Any]:
    """msgspec's JSON Schema of `cls` in pydantic's shape: the top-level object inline (unless it
    is recursive), the types it refers to in `$defs`."""
    import msgspec

    template = ref_template.replace("{model}", "{name}")
    (schema,), defs = msgspec.json.schema_components((cls,), ref_template=template)
    ref = schema.get("$ref")
    if len(schema) == 1 and isinstance(ref, str):
        name = next((n for n in defs if template.format(name=n) == ref), None)
        if name is not None and f'"{ref}"'.encode() not in orjson.dumps(defs):
            schema = defs.pop(name)
    return {**schema, "$defs": defs} if defs else dict(schema)


def check_payload_type(cls: Any) -> None:
    """Raise `ConfigurationError` unless values of `cls` can be decoded and validated: a pydantic
    model, a dataclass, a `msgspec.Struct`, or another type pydantic (or msgspec) can take.

    A handler's payload annotation is checked at declaration (`@handles`), so a wrong one fails
    loudly there instead of dead-lettering (or dropping) every event it was meant to take.
    """
    _codec(cls)


def json_schema(cls: Any, *, ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """The JSON Schema of a payload type (for AsyncAPI/OpenAPI documents); the types it refers
    to are in its `$defs`, referred to by `ref_template` (`{model}`: the type's name)."""
    return _codec(cls).json_schema(ref_template)


def _orjson_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Decimal):  # a string, as pydantic and msgspec write it: no rounding
        return str(value)
    msgspec = _loaded_msgspec()
    if msgspec is not None and isinstance(value, msgspec.Struct):  # one nested in a dict or list
        return msgspec.to_builtins(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_ENCODERS: dict[type, Callable[[Any], bytes]] = {}


def encode_payload(data: Any) -> bytes:
    """The JSON bytes of a payload (a model, a dataclass, a Struct, or plain JSON-able values)."""
    encode = _ENCODERS.get(type(data))
    if encode is None:
        encode = _encoder(type(data))
        if len(_ENCODERS) < _CACHED_TYPES:
            _ENCODERS[type(data)] = encode
    return encode(data)


def _encoder(cls: type) -> Callable[[Any], bytes]:
    """The JSON encoder of values of exactly `cls`: chosen once per type, because the checks
    (pydantic's metaclass `isinstance`, a union of types) cost more than encoding a small event."""
    if issubclass(cls, BaseModel):
        return _encode_model
    if issubclass(cls, bytes | bytearray | memoryview):
        return bytes
    msgspec = _loaded_msgspec()
    if msgspec is not None and issubclass(cls, msgspec.Struct):
        return cast(Callable[[Any], bytes], msgspec.json.encode)
    return _encode_plain


def _encode_model(model: BaseModel) -> bytes:
    # The model's serializer at call time (`model_rebuild` replaces it), in Rust.
    return model.__pydantic_serializer__.to_json(model)


_encode_plain: Callable[[Any], bytes] = functools.partial(orjson.dumps, default=_orjson_default)


def _msgspec_errors() -> tuple[type[Exception], ...]:
    """What msgspec raises for invalid input (its `ValidationError` is a `DecodeError`); nothing
    when it is not loaded. Evaluated only while an exception is being matched."""
    msgspec = _loaded_msgspec()
    return () if msgspec is None else (msgspec.DecodeError,)


def decode_payload(raw: bytes, cls: type[T]) -> T:
    """Parse and validate JSON bytes as `cls`; `PayloadValidationError` says what is wrong."""
    try:
        value: T = (_CODECS.get(cls) or _codec(cls)).decode_json(raw)
        return value
    except ValidationError as exc:
        raise _validation_error(exc, cls) from None
    except _msgspec_errors() as exc:
        raise _msgspec_validation_error(exc, cls) from None


def validate_payload(value: Any, cls: type[T]) -> T:
    """Validate an already-parsed value (e.g. a decoded XML or form body) as `cls`."""
    try:
        valid: T = _codec(cls).validate_python(value)
        return valid
    except ValidationError as exc:
        raise _validation_error(exc, cls) from None
    except _msgspec_errors() as exc:
        raise _msgspec_validation_error(exc, cls) from None


def _invalid(cls: Any, errors: list[dict[str, Any]]) -> PayloadValidationError:
    return PayloadValidationError(
        f"payload is not a valid {type_name(cls)}: {len(errors)} error(s): "
        + "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in errors),
        errors=errors,
    )


def _validation_error(exc: ValidationError, cls: Any) -> PayloadValidationError:
    return _invalid(
        cls, [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    )


_MSGSPEC_AT = re.compile(r"(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_MSGSPEC_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MSGSPEC_FIELD = re.compile(r"Object (missing required|contains unknown) field `([^`]*)`")


def _msgspec_validation_error(exc: Exception, cls: Any) -> PayloadValidationError:
    """The one error msgspec reports (`Expected `int`, got `str` - at `$.lines[0].qty``) in
    pydantic's shape: `loc` ["lines", 0, "qty"], `msg`, and a `type` of pydantic's names."""
    import msgspec

    if not isinstance(exc, msgspec.ValidationError):  # not JSON at all
        return _invalid(cls, [{"loc": [], "msg": f"Invalid JSON: {exc}", "type": "json_invalid"}])
    match = _MSGSPEC_AT.fullmatch(str(exc))
    assert match is not None  # the pattern matches any text
    loc: list[str | int] = [
        int(index) if index.isdigit() else name or index
        for name, index in _MSGSPEC_STEP.findall(match["path"] or "")
    ]
    kind = "value_error"
    field_error = _MSGSPEC_FIELD.fullmatch(match["msg"])
    if field_error is not None:
        loc.append(field_error[2])
        kind = "missing" if field_error[1] == "missing required" else "extra_forbidden"
    return _invalid(cls, [{"loc": loc, "msg": match["msg"], "type": kind}])


class MessageRegistry:
    """CloudEvents `type` -> payload class, for decoding incoming events to typed data."""

    def __init__(self) -> None:
        self._types: dict[str, type[Any]] = {}

    def register(self, cls: type[Any], name: str | None = None) -> str:
        name = name or type_name(cls)
        known = self._types.get(name)
        if known is not None and known is not cls:
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


def format_time(value: datetime) -> bytes:
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


_SPECVERSION_1 = ("ce_specversion", b"1.0")
_JSON_CONTENT = (CONTENT_TYPE, JSON.encode())


def binary_headers(
    specversion: str,
    event_id: str,
    source: str,
    event_type: str,
    time: bytes,
    datacontenttype: str,
    subject: str | None,
    correlationid: str | None,
    causationid: str | None,
    traceparent: str | None,
    key: bytes | None,
    extensions: Mapping[str, str] | None,
) -> Headers:
    """The binary-mode headers of an event given its attributes (`time` already formatted,
    `key` the encoded partition key). Positional, for the publish path: `to_binary` writes
    every envelope through it, and `Bus.publish` writes through it without building one."""
    headers: list[tuple[str, bytes]] = [
        _SPECVERSION_1 if specversion == "1.0" else ("ce_specversion", specversion.encode()),
        ("ce_id", event_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", event_type.encode()),
        ("ce_time", time),
        _JSON_CONTENT if datacontenttype == JSON else (CONTENT_TYPE, datacontenttype.encode()),
    ]
    append = headers.append
    if subject is not None:
        append(("ce_subject", subject.encode()))
    if correlationid is not None:
        append(("ce_correlationid", correlationid.encode()))
    if causationid is not None:
        append(("ce_causationid", causationid.encode()))
    if traceparent is not None:
        append(("ce_traceparent", traceparent.encode()))
    if key is not None:
        append(("ce_partitionkey", key))
    if extensions:
        for name, value in extensions.items():
            append((CE_PREFIX + name, value.encode()))
    return tuple(headers)


_clock: tuple[int, bytes] = (-1, b"")
"""The second `time_now` last formatted and its text, read and replaced as one pair."""


def time_now() -> bytes:
    """The time now as `format_time` writes it, without a `datetime`: the seconds are formatted
    once per second and only the microseconds per call."""
    global _clock
    now = epoch_seconds()
    second = int(now)
    formatted, prefix = _clock
    if second != formatted:  # threads racing here only format the same second twice
        prefix = strftime("%Y-%m-%dT%H:%M:%S", gmtime(second)).encode()
        _clock = (second, prefix)
    return b"%s.%06dZ" % (prefix, int((now - second) * 1_000_000))


def to_binary(envelope: Envelope[Any]) -> tuple[bytes | None, bytes, Headers]:
    """Record key, value and headers of an envelope in the Kafka binding's binary mode."""
    key = None if envelope.partitionkey is None else envelope.partitionkey.encode()
    headers = binary_headers(
        envelope.specversion,
        envelope.id,
        envelope.source,
        envelope.type,
        format_time(envelope.time),
        envelope.datacontenttype,
        envelope.subject,
        envelope.correlationid,
        envelope.causationid,
        envelope.traceparent,
        key,
        envelope.extensions,
    )
    return key, encode_payload(envelope.data), headers


def _parse_time(raw: str) -> datetime:
    try:
        return datetime.fromisoformat(raw)
    except ValueError as exc:
        raise DecodeError(f"ce_time {raw!r} is not an RFC 3339 timestamp") from exc


def from_binary(record: Record) -> Envelope[bytes]:
    """The envelope of a binary-mode record; `data` stays raw bytes until typed decoding."""
    content_type = JSON
    attributes: dict[str, str] = {}
    known = _HEADER_ATTRIBUTES.get  # one dict lookup instead of two slices per header
    try:
        for name, value in record.headers:
            attribute = known(name)
            if attribute is not None:
                attributes[attribute] = value.decode()
            elif name[:3] == CE_PREFIX:
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
        if not attributes.keys() <= _STANDARD
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
        "time": format_time(envelope.time).decode(),
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
