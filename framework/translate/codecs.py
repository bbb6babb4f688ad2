"""Format codecs: JSON, XML, HTML forms and plain text to JSON-like values and back.

Every codec obeys `framework.types.Codec`: `decode(bytes)` gives dicts, lists, str, int, float,
bool and None; `encode(value)` writes them back. Codecs refuse bad input with the framework's
own errors and never let a parser's exception through:

- `TranslationError` (400): malformed input, or a value the format cannot carry;
- `UnsafeInputError` (400): an XML DTD, entity or external reference, a document deeper than
  `max_depth` or larger than `max_bytes`, too many form fields;
- `UnsupportedMediaType` (415) and `NotAcceptable` (406): from `CodecRegistry` negotiation.

A `CodecRegistry` picks the codec for a `Content-Type` or an `Accept` header::

    registry = default_registry()
    order = registry.for_content_type("text/xml; charset=utf-8").decode(body)
    reply = registry.for_accept("application/xml;q=0.9, application/json").encode(order)
    convert(b'{"id": "A-1"}', "application/json", "application/xml")
    # b'<?xml version="1.0" encoding="UTF-8"?>\\n<root><id>A-1</id></root>'

The XML mapping convention is written down on `XmlCodec`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from defusedxml import (
    DefusedXmlException,
    DTDForbidden,
    EntitiesForbidden,
    ExternalReferenceForbidden,
)
from defusedxml.ElementTree import DefusedXMLParser, ParseError

from framework.errors import (
    ConfigurationError,
    TranslationError,
    UnsafeInputError,
    UnsupportedMediaType,
)
from framework.types import Codec

__all__ = [
    "CodecRegistry",
    "FormCodec",
    "JsonCodec",
    "NotAcceptable",
    "TextCodec",
    "XmlCodec",
    "convert",
    "default_registry",
]

_UNICODE_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


class NotAcceptable(UnsupportedMediaType):
    """No codec writes any media type the `Accept` header allows."""

    status = 406


def _render(path: Iterable[str | int]) -> str:
    """`("order", "lines", 2, "sku")` as `order.lines[2].sku`."""
    text = ""
    for segment in path:
        if isinstance(segment, int):
            text += f"[{segment}]"
        else:
            text = f"{text}.{segment}" if text else segment
    return text


def _scalar_text(value: Any, path: tuple[str | int, ...]) -> str | None:
    """The text XML and forms carry for a scalar: `true`/`false`, `str(number)`, None kept."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise TranslationError(
        f"{type(value).__name__} is not a JSON-like value", path=_render(path) or None
    )


class JsonCodec:
    """`application/json` with orjson; refuses documents nested deeper than `max_depth`.

    orjson itself stops at 1024 levels, so a larger `max_depth` has no effect beyond that.
    """

    media_type = "application/json"

    def __init__(self, *, max_depth: int = 64) -> None:
        if max_depth < 1:
            raise ConfigurationError(f"max_depth must be at least 1, not {max_depth}")
        self.max_depth = max_depth

    def __repr__(self) -> str:
        return f"JsonCodec(max_depth={self.max_depth})"

    def decode(self, body: bytes) -> Any:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if exc.msg.startswith("depth limit exceeded"):
                raise UnsafeInputError(
                    f"JSON document nested deeper than {self.max_depth} levels"
                ) from exc
            raise TranslationError(
                f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from exc
        # Depth can only exceed the count of opening brackets: most bodies skip the walk.
        if body.count(b"{") + body.count(b"[") > self.max_depth:
            self._check_depth(value)
        return value

    def _check_depth(self, value: Any) -> None:
        pending: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
        while pending:
            node, depth = pending.pop()
            for child in node.values() if isinstance(node, dict) else node:
                if isinstance(child, dict | list):
                    if depth == self.max_depth:
                        raise UnsafeInputError(
                            f"JSON document nested deeper than {self.max_depth} levels"
                        )
                    pending.append((child, depth + 1))

    def encode(self, value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError as exc:
            raise TranslationError(f"cannot write JSON: {exc}") from exc


_NAME_START = (
    "A-Z_a-z\xc0-\xd6\xd8-\xf6\xf8-\u02ff\u0370-\u037d\u037f-\u1fff\u200c-\u200d"
    "\u2070-\u218f\u2c00-\u2fef\u3001-\ud7ff\uf900-\ufdcf\ufdf0-\ufffd\U00010000-\U000effff"
)
_NCNAME = re.compile(f"[{_NAME_START}][{_NAME_START}\\-.0-9\xb7\u0300-\u036f\u203f-\u2040]*")
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@lru_cache(maxsize=4096)
def _is_xml_name(name: str) -> bool:
    return _NCNAME.fullmatch(name) is not None


def _xml_text(text: str, path: tuple[str | int, ...]) -> str:
    if _NOT_XML_CHAR.search(text):
        raise TranslationError("text holds a character XML cannot carry", path=_render(path))
    # \r is escaped so that a parser's end-of-line normalisation gives it back unchanged.
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    )


def _xml_attribute(text: str, path: tuple[str | int, ...]) -> str:
    # Tabs and newlines as references too: parsers turn literal ones into spaces in attributes.
    return _xml_text(text, path).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")


class _Element:
    """One open element while decoding: its attributes, children so far, and text pieces."""

    __slots__ = ("attributes", "children", "text")

    def __init__(self, attributes: dict[str, str]) -> None:
        self.attributes = attributes
        self.children: dict[str, Any] | None = None
        self.text: list[str] = []

    def add(self, name: str, value: Any, always_list: bool) -> None:
        if self.children is None:
            self.children = {}
        if name not in self.children:
            self.children[name] = [value] if always_list else value
            return
        # Decoded values are never lists, except the ones repetition builds here.
        seen = self.children[name]
        if isinstance(seen, list):
            seen.append(value)
        else:
            self.children[name] = [seen, value]

    def content(self) -> Any:
        text = "".join(self.text)
        if self.children is None and not self.attributes:
            return text or None
        content: dict[str, Any] = {f"@{name}": value for name, value in self.attributes.items()}
        if self.children is not None:
            content.update(self.children)
            text = text.strip()  # the indentation between child elements
        if text:
            content["#text"] = text
        return content


class _ContentBuilder:
    """A parser target that builds the JSON-like content directly, refusing deep nesting."""

    def __init__(self, *, max_depth: int, lists: frozenset[str]) -> None:
        self._max_depth = max_depth
        self._lists = lists
        self._open: list[_Element] = []
        self._content: Any = None
        self.root_tag = ""

    def start(self, tag: str, attributes: dict[str, str]) -> None:
        if len(self._open) >= self._max_depth:
            raise UnsafeInputError(f"XML document nested deeper than {self._max_depth} levels")
        self._open.append(_Element(attributes))

    def data(self, text: str) -> None:
        if self._open:
            self._open[-1].text.append(text)

    def end(self, tag: str) -> None:
        content = self._open.pop().content()
        if self._open:
            self._open[-1].add(tag, content, tag in self._lists)
        else:
            self.root_tag = tag
            self._content = content

    def close(self) -> Any:
        return self._content


_REFUSED: dict[type[DefusedXmlException], str] = {
    DTDForbidden: "a document type declaration (DTD)",
    EntitiesForbidden: "an entity declaration",
    ExternalReferenceForbidden: "an external reference",
}


class XmlCodec:
    """`application/xml` (and `text/xml`), parsed safely with defusedxml.

    DTDs, entity declarations and external references are refused (`UnsafeInputError`), which
    stops billion laughs, quadratic blowup and XXE before anything expands; so are bodies over
    `max_bytes` and elements nested deeper than `max_depth`. Malformed XML is a
    `TranslationError` naming the line and column.

    The convention (BadgerFish-lite), the same in both directions::

        <order id="A-1">                       {"@id": "A-1",
          <customer>Ada</customer>              "customer": "Ada",
          <line><sku>X</sku></line>             "line": [{"sku": "X"},
          <line><sku>Y</sku></line>                      {"sku": "Y"}],
          <note lang="en">fragile</note>        "note": {"@lang": "en", "#text": "fragile"},
          <gift/>                               "gift": None}
        </order>

    - `decode` returns the root element's content; `encode` wraps a value in `<{root}>`. The
      root's name is only checked on decode with `check_root=True`.
    - Child elements become keys; a repeated child becomes a list; attributes become `@name`
      keys. Text is a str, and an element with no text, attributes or children is None.
    - An element with attributes or children keeps its text under `#text` (stripped of the
      surrounding whitespace when it has children: that is indentation).
    - A list is written as repeated elements named after its key; a list at the top or inside
      another list is written as `<{item}>` elements.
    - Names in `lists` always decode as lists, so a list of one survives a round trip.
    - Encoding writes `True`/`False` as `true`/`false`, numbers with `str`, and None, "" and {}
      as an empty element (an attribute that is None is left out). Keys must be XML names
      without a colon: namespaced names decode as `{uri}local` and cannot be encoded.

    So `decode(encode(x)) == x` holds for dicts whose leaves are non-empty strings, whose dicts
    are non-empty and whose lists hold at least two items (or are named in `lists`). Otherwise
    it gives `x` with scalars as their text, "" and {} as None, empty lists left out, a list of
    one as its item, a list of lists as `{item: [...]}` per inner list, and a dict holding only
    `#text` as that text.
    """

    media_type = "application/xml"

    def __init__(
        self,
        *,
        root: str = "root",
        item: str = "item",
        lists: Iterable[str] = (),
        check_root: bool = False,
        max_bytes: int = 1 << 20,
        max_depth: int = 64,
    ) -> None:
        if isinstance(lists, str):
            raise ConfigurationError(f"lists is a collection of names, not the string {lists!r}")
        for name in (root, item, *lists):
            if not _is_xml_name(name):
                raise ConfigurationError(f"{name!r} is not an XML element name")
        if max_bytes < 1 or not 1 <= max_depth <= 256:
            raise ConfigurationError("max_bytes must be positive and max_depth within 1..256")
        self.root = root
        self.item = item
        self.lists = frozenset(lists)
        self.check_root = check_root
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    def __repr__(self) -> str:
        return f"XmlCodec(root={self.root!r}, item={self.item!r})"

    def decode(self, body: bytes) -> Any:
        if len(body) > self.max_bytes:
            raise UnsafeInputError(f"XML body over {self.max_bytes} bytes")
        builder = _ContentBuilder(max_depth=self.max_depth, lists=self.lists)
        parser = DefusedXMLParser(
            target=builder, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
        try:
            parser.feed(body)
            content = parser.close()
        except DefusedXmlException as exc:
            raise UnsafeInputError(
                f"XML refused: it holds {_REFUSED.get(type(exc), 'forbidden markup')}"
            ) from exc
        except ParseError as exc:
            raise TranslationError(f"malformed XML: {exc}") from exc
        if self.check_root and builder.root_tag != self.root:
            raise TranslationError(f"expected root element <{self.root}>, got <{builder.root_tag}>")
        return content

    def encode(self, value: Any) -> bytes:
        parts = ['<?xml version="1.0" encoding="UTF-8"?>\n']
        self._write(parts, self.root, value, (), 1)
        return "".join(parts).encode()

    def _write(
        self, parts: list[str], name: str, value: Any, path: tuple[str | int, ...], depth: int
    ) -> None:
        if depth > self.max_depth:
            raise UnsafeInputError(
                f"value nested deeper than {self.max_depth} levels", path=_render(path)
            )
        if isinstance(value, dict):
            self._write_dict(parts, name, value, path, depth)
        elif isinstance(value, list):
            if not value:
                parts.append(f"<{name}/>")
                return
            parts.append(f"<{name}>")
            for index, item in enumerate(value):
                self._write(parts, self.item, item, (*path, index), depth + 1)
            parts.append(f"</{name}>")
        else:
            text = _scalar_text(value, path)
            if text:
                parts.append(f"<{name}>{_xml_text(text, path)}</{name}>")
            else:
                parts.append(f"<{name}/>")

    def _write_dict(
        self,
        parts: list[str],
        name: str,
        value: dict[str, Any],
        path: tuple[str | int, ...],
        depth: int,
    ) -> None:
        start = [f"<{name}"]
        text: str | None = None
        children: list[tuple[str, Any]] = []
        for key, member in value.items():
            if not isinstance(key, str):
                raise TranslationError("XML names must be strings", path=_render(path) or None)
            if key == "#text":
                text = _scalar_text(member, (*path, key))
            elif key.startswith("@"):
                attribute = _scalar_text(member, (*path, key))
                if not _is_xml_name(key[1:]):
                    raise TranslationError(
                        f"{key[1:]!r} is not an XML attribute name", path=_render((*path, key))
                    )
                if attribute is not None:
                    start.append(f' {key[1:]}="{_xml_attribute(attribute, (*path, key))}"')
            elif not _is_xml_name(key):
                raise TranslationError(
                    f"{key!r} is not an XML element name", path=_render((*path, key))
                )
            else:
                children.append((key, member))
        parts.append("".join(start))
        if not text and not children:
            parts.append("/>")
            return
        parts.append(">")
        if text:
            parts.append(_xml_text(text, path))
        for key, member in children:
            if isinstance(member, list):
                for index, item in enumerate(member):
                    self._write(parts, key, item, (*path, key, index), depth + 1)
            else:
                self._write(parts, key, member, (*path, key), depth + 1)
        parts.append(f"</{name}>")


_BAD_PERCENT = re.compile("%(?![0-9A-Fa-f]{2})")


class FormCodec:
    """`application/x-www-form-urlencoded`: a flat dict of strings, repeated keys as lists.

    `a=1&a=2&b=` decodes to `{"a": ["1", "2"], "b": ""}`. With `nested=True`, dotted keys
    build sub-objects both ways: `customer.name=Ada` is `{"customer": {"name": "Ada"}}`.
    Encoding writes lists as repeated keys, `True`/`False` as `true`/`false` and None as an
    empty value; lists of objects cannot be written. Percent-escapes must be valid UTF-8.
    """

    media_type = "application/x-www-form-urlencoded"

    def __init__(self, *, nested: bool = False, max_num_fields: int = 1000) -> None:
        if max_num_fields < 1:
            raise ConfigurationError(f"max_num_fields must be at least 1, not {max_num_fields}")
        self.nested = nested
        self.max_num_fields = max_num_fields

    def __repr__(self) -> str:
        return f"FormCodec(nested={self.nested}, max_num_fields={self.max_num_fields})"

    def decode(self, body: bytes) -> Any:
        try:
            text = body.decode()
        except UnicodeDecodeError as exc:
            raise TranslationError(f"form body is not UTF-8: {exc.reason}") from exc
        if text.count("&") >= self.max_num_fields:
            raise UnsafeInputError(f"form body with more than {self.max_num_fields} fields")
        if bad := _BAD_PERCENT.search(text):
            raise TranslationError(f"bad percent-escape at offset {bad.start()} of the form body")
        try:
            pairs = parse_qsl(
                text,
                keep_blank_values=True,
                strict_parsing=True,
                errors="strict",
                max_num_fields=self.max_num_fields,
            )
        except UnicodeDecodeError as exc:
            raise TranslationError(f"form field is not UTF-8: {exc.reason}") from exc
        except ValueError as exc:
            raise TranslationError(f"malformed form body: {exc}") from exc
        form: dict[str, Any] = {}
        for key, value in pairs:
            if self.nested:
                self._put_nested(form, key, value)
            else:
                self._put(form, key, value, key)
        return form

    @staticmethod
    def _put(fields: dict[str, Any], name: str, value: str, key: str) -> None:
        seen = fields.get(name)
        if seen is None:
            fields[name] = value
        elif isinstance(seen, str):
            fields[name] = [seen, value]
        elif isinstance(seen, list):
            seen.append(value)
        else:
            raise TranslationError(f"form field {key!r} is both a value and an object", path=key)

    def _put_nested(self, form: dict[str, Any], key: str, value: str) -> None:
        *parents, name = key.split(".")
        if not all((*parents, name)):
            raise TranslationError(f"form field {key!r} has an empty name segment", path=key)
        node = form
        for parent in parents:
            child = node.setdefault(parent, {})
            if not isinstance(child, dict):
                raise TranslationError(
                    f"form field {key!r} is both a value and an object", path=key
                )
            node = child
        self._put(node, name, value, key)

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, dict):
            raise TranslationError(f"a form holds an object, not a {type(value).__name__}")
        return urlencode(list(self._pairs(value, ()))).encode("ascii")

    def _pairs(self, fields: dict[str, Any], path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
        for key, value in fields.items():
            here = (*path, key)
            if not isinstance(key, str) or (self.nested and "." in key):
                raise TranslationError(f"{key!r} cannot be a form field name", path=_render(path))
            if isinstance(value, dict):
                if not self.nested:
                    raise TranslationError(
                        "a flat form cannot hold an object (use nested=True)", path=_render(here)
                    )
                yield from self._pairs(value, here)
                continue
            name = ".".join(here)
            for item in value if isinstance(value, list) else (value,):
                if isinstance(item, dict | list):
                    raise TranslationError(
                        "a form list holds only plain values", path=_render(here)
                    )
                yield name, _scalar_text(item, here) or ""


class TextCodec:
    """`text/plain` in UTF-8: a str in, a str out."""

    media_type = "text/plain"

    def __repr__(self) -> str:
        return "TextCodec()"

    def decode(self, body: bytes) -> Any:
        try:
            return body.decode()
        except UnicodeDecodeError as exc:
            raise TranslationError(f"text body is not UTF-8: {exc.reason}") from exc

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, str):
            raise TranslationError(f"text/plain carries a str, not a {type(value).__name__}")
        return value.encode()


def _parse_media_type(header: str) -> tuple[str, dict[str, str]]:
    """`"Application/XML; charset=UTF-8"` as `("application/xml", {"charset": "UTF-8"})`."""
    media_type, *rest = header.split(";")
    media_type = media_type.strip().lower()
    params: dict[str, str] = {}
    for param in rest:
        name, _, value = param.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return media_type, params


class CodecRegistry:
    """The codecs a service or gateway speaks, chosen by `Content-Type` or `Accept`.

    `register(codec, *aliases)` adds a codec under its media type and aliases (a later
    registration of the same name replaces the earlier one). Structured suffixes fall back to
    their base format: `application/problem+json` is read by the `application/json` codec.
    A missing header means `default`. Only UTF-8 (or its ASCII subset) is accepted as charset.
    """

    def __init__(self, *, default: str = "application/json") -> None:
        self.default = default.lower()
        self._codecs: dict[str, Codec] = {}
        self._primary: dict[str, Codec] = {}

    def __repr__(self) -> str:
        return f"CodecRegistry({self.media_types})"

    def register(self, codec: Codec, *aliases: str) -> None:
        if not isinstance(codec, Codec):
            raise ConfigurationError(f"{codec!r} is not a Codec (media_type, decode, encode)")
        self._primary[codec.media_type.lower()] = codec
        for name in (codec.media_type, *aliases):
            self._codecs[name.lower()] = codec

    @property
    def media_types(self) -> list[str]:
        """Every media type a codec is registered under, aliases included."""
        return list(self._codecs)

    def _unsupported(self, what: str) -> UnsupportedMediaType:
        return UnsupportedMediaType(f"{what}; supported: {', '.join(self._codecs)}")

    def for_content_type(self, header: str | None) -> Codec:
        """The codec that reads a body sent with this `Content-Type` (415 if none does)."""
        media_type, params = _parse_media_type(
            header if header and header.strip() else self.default
        )
        codec = self._codecs.get(media_type)
        if codec is None and "+" in media_type:
            codec = self._codecs.get(f"application/{media_type.rpartition('+')[2]}")
        if codec is None:
            raise self._unsupported(f"no codec for {media_type!r}")
        charset = params.get("charset")
        if charset is not None and charset.lower() not in _UNICODE_CHARSETS:
            raise self._unsupported(f"charset {charset!r} is not supported, send UTF-8")
        return codec

    def for_accept(self, header: str | None) -> Codec:
        """The codec to answer with under this `Accept` header (406 if nothing fits).

        The highest q-value wins; at equal q a named type beats `type/*`, which beats `*/*`,
        then the earlier in the header, then the default codec. Wildcards match the codecs'
        own media types, not aliases. A missing header accepts the default.
        """
        if not header or not header.strip():
            return self.for_content_type(None)
        ranges = list(_parse_accept(header))
        best: tuple[float, int, int, bool] | None = None
        chosen: Codec | None = None
        for name, codec in self._codecs.items():
            primary = self._primary.get(name) is codec
            match = _best_range(name, primary, ranges)
            if match is None or match[0] <= 0:
                continue
            quality, specificity, position = match
            rank = (quality, specificity, -position, name == self.default)
            if best is None or rank > best:
                best, chosen = rank, codec
        if chosen is None:
            raise NotAcceptable(
                f"nothing acceptable in {header!r}; supported: {', '.join(self._codecs)}"
            )
        return chosen


def _parse_accept(header: str) -> Iterator[tuple[str, float, int]]:
    """`(media range, q, position)` for each well-formed range of an `Accept` header."""
    for position, entry in enumerate(header.split(",")):
        media_range, params = _parse_media_type(entry)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            continue
        if "/" in media_range and 0 <= quality <= 1:
            yield media_range, quality, position


def _best_range(
    name: str, primary: bool, ranges: list[tuple[str, float, int]]
) -> tuple[float, int, int] | None:
    """The most specific range matching `name`, as `(q, specificity, position)`."""
    major = name.partition("/")[0]
    best: tuple[float, int, int] | None = None
    for media_range, quality, position in ranges:
        if media_range == name:
            specificity = 2
        elif primary and media_range == f"{major}/*":
            specificity = 1
        elif primary and media_range == "*/*":
            specificity = 0
        else:
            continue
        if best is None or (specificity, -position) > (best[1], -best[2]):
            best = (quality, specificity, position)
    return best


def default_registry() -> CodecRegistry:
    """A new registry with every codec here, JSON the default, `text/xml` read as XML."""
    registry = CodecRegistry()
    registry.register(JsonCodec())
    registry.register(XmlCodec(), "text/xml")
    registry.register(FormCodec())
    registry.register(TextCodec())
    return registry


_DEFAULT_REGISTRY = default_registry()


def convert(
    body: bytes, from_type: str, to_type: str, registry: CodecRegistry | None = None
) -> bytes:
    """Re-encode a body from one content type to another, e.g. JSON to XML."""
    codecs = registry or _DEFAULT_REGISTRY
    value = codecs.for_content_type(from_type).decode(body)
    return codecs.for_content_type(to_type).encode(value)
