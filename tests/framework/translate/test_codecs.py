"""Format codecs: JSON, XML (safe parsing, the mapping convention), forms, text, negotiation."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.errors import (
    ConfigurationError,
    TranslationError,
    UnsafeInputError,
    UnsupportedMediaType,
)
from framework.translate.codecs import (
    CodecRegistry,
    FormCodec,
    JsonCodec,
    NotAcceptable,
    TextCodec,
    XmlCodec,
    convert,
    default_registry,
)
from framework.types import Codec

ORDER: dict[str, Any] = {
    "@id": "A-1001",
    "@currency": "EUR",
    "customer": {
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "address": {"street": "Main St 1", "city": "Oslo", "zip": "0150"},
    },
    "line": [
        {"sku": "KB-1", "qty": 2, "price": 49.5},
        {"sku": "MS-7", "qty": 1, "price": 19.0},
    ],
    "note": {"@lang": "en", "#text": "leave at the door & ring"},
    "paid": True,
    "gift": False,
    "coupon": None,
}

ORDER_AS_TEXT: dict[str, Any] = {
    "@id": "A-1001",
    "@currency": "EUR",
    "customer": {
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "address": {"street": "Main St 1", "city": "Oslo", "zip": "0150"},
    },
    "line": [
        {"sku": "KB-1", "qty": "2", "price": "49.5"},
        {"sku": "MS-7", "qty": "1", "price": "19.0"},
    ],
    "note": {"@lang": "en", "#text": "leave at the door & ring"},
    "paid": "true",
    "gift": "false",
    "coupon": None,
}


def test_every_codec_obeys_the_protocol() -> None:
    for codec in (JsonCodec(), XmlCodec(), FormCodec(), TextCodec()):
        assert isinstance(codec, Codec)


# JSON


def test_json_round_trips_an_order() -> None:
    codec = JsonCodec()
    assert codec.decode(codec.encode(ORDER)) == ORDER


def test_malformed_json_is_a_400_naming_line_and_column() -> None:
    with pytest.raises(TranslationError, match=r"line 2, column 2") as caught:
        JsonCodec().decode(b'{"a": 1,\n x}')
    assert caught.value.status == 400
    assert isinstance(caught.value.__cause__, orjson.JSONDecodeError)


@pytest.mark.parametrize("body", [b"", b"{", b'{"a": "\xff"}', b"[1,]"])
def test_json_that_is_not_json_is_refused(body: bytes) -> None:
    with pytest.raises(TranslationError):
        JsonCodec().decode(body)


def test_json_depth_is_limited() -> None:
    codec = JsonCodec(max_depth=3)
    assert codec.decode(b'{"a": [{"b": 1}]}') == {"a": [{"b": 1}]}
    assert codec.decode(b'"[[[[[[[["') == "[[[[[[[["  # brackets inside a string do not count
    with pytest.raises(UnsafeInputError, match="deeper than 3"):
        codec.decode(b'{"a": [{"b": [1]}]}')
    with pytest.raises(UnsafeInputError):  # beyond orjson's own limit too
        JsonCodec().decode(b"[" * 2000 + b"]" * 2000)


def test_json_refuses_values_it_cannot_write() -> None:
    with pytest.raises(TranslationError, match="cannot write JSON"):
        JsonCodec().encode({"when": object()})


# XML: the convention


def test_xml_encodes_the_order_by_the_convention() -> None:
    body = XmlCodec(root="order").encode(ORDER)
    assert body == (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<order id="A-1001" currency="EUR">'
        b"<customer><name>Ada Lovelace</name><email>ada@example.com</email>"
        b"<address><street>Main St 1</street><city>Oslo</city><zip>0150</zip></address>"
        b"</customer>"
        b"<line><sku>KB-1</sku><qty>2</qty><price>49.5</price></line>"
        b"<line><sku>MS-7</sku><qty>1</qty><price>19.0</price></line>"
        b'<note lang="en">leave at the door &amp; ring</note>'
        b"<paid>true</paid><gift>false</gift><coupon/>"
        b"</order>"
    )


def test_json_to_xml_and_back_keeps_the_order_with_text_scalars() -> None:
    registry = default_registry()
    registry.register(XmlCodec(root="order"), "text/xml")
    xml = convert(orjson.dumps(ORDER), "application/json", "application/xml", registry)
    back = convert(xml, "text/xml; charset=utf-8", "application/json", registry)
    assert orjson.loads(back) == ORDER_AS_TEXT


def test_xml_decodes_attributes_text_repetition_and_empty_elements() -> None:
    body = b"""<?xml version="1.0"?>
    <order id="7">
      <!-- a comment is ignored -->
      <tag>a</tag>
      <tag>b</tag>
      <tag/>
      <note lang="en"> keep  spaces </note>
      <empty></empty>
      <mixed>hello <b>bold</b> world</mixed>
      <code><![CDATA[<x> & y]]></code>
      <flag on="yes"/>
    </order>"""
    assert XmlCodec().decode(body) == {
        "@id": "7",
        "tag": ["a", "b", None],
        "note": {"@lang": "en", "#text": " keep  spaces "},
        "empty": None,
        "mixed": {"b": "bold", "#text": "hello  world"},
        "code": "<x> & y",
        "flag": {"@on": "yes"},
    }


def test_xml_lists_keep_a_single_item_a_list() -> None:
    body = b"<order><line><sku>A</sku></line></order>"
    assert XmlCodec().decode(body) == {"line": {"sku": "A"}}
    assert XmlCodec(lists=["line"]).decode(body) == {"line": [{"sku": "A"}]}


def test_xml_writes_top_level_lists_and_lists_of_lists_as_items() -> None:
    codec = XmlCodec(root="rows", item="row")
    body = codec.encode([{"a": "1"}, [1, 2]])
    assert body.endswith(b"<rows><row><a>1</a></row><row><row>1</row><row>2</row></row></rows>")
    assert codec.decode(body) == {"row": [{"a": "1"}, {"row": ["1", "2"]}]}
    assert codec.encode({"grid": [[1], []]}).endswith(
        b"<rows><grid><row>1</row></grid><grid/></rows>"
    )


def test_xml_escapes_text_and_attributes_so_they_come_back_unchanged() -> None:
    codec = XmlCodec()
    value = {"@title": 'a "quoted"\tline\r\nnext <&>', "text": "x\r\ny ]]> <&>"}
    body = codec.encode(value)
    assert b"\r" not in body
    assert codec.decode(body) == value


def test_xml_checks_the_root_name_only_when_asked() -> None:
    body = b"<invoice><id>1</id></invoice>"
    assert XmlCodec(root="order").decode(body) == {"id": "1"}
    with pytest.raises(TranslationError, match="expected root element <order>, got <invoice>"):
        XmlCodec(root="order", check_root=True).decode(body)


def test_xml_keeps_namespaced_names_in_clark_notation() -> None:
    body = b'<o xmlns="urn:shop" xmlns:x="urn:x"><id x:kind="k">1</id></o>'
    assert XmlCodec().decode(body) == {"{urn:shop}id": {"@{urn:x}kind": "k", "#text": "1"}}


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"1st": "x"}, "1st"),
        ({"a b": "x"}, "a b"),
        ({"ns:x": "x"}, "ns:x"),
        ({"a": {"@bad name": "x"}}, "a.@bad name"),
        ({"a": [{"": "x"}]}, "a[0]."),
        ({"a": "bell\x07"}, "a"),
        ({"a": {"b": {1, 2}}}, "a.b"),
        ({"a": {"@id": {"nested": "x"}}}, "a.@id"),
    ],
)
def test_xml_refuses_what_it_cannot_write_naming_the_path(value: Any, path: str) -> None:
    with pytest.raises(TranslationError) as caught:
        XmlCodec().encode(value)
    assert caught.value.path == path


def test_xml_codec_configuration_is_checked() -> None:
    with pytest.raises(ConfigurationError):
        XmlCodec(root="not a name")
    with pytest.raises(ConfigurationError):
        XmlCodec(max_depth=0)


# XML: refusing unsafe input

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol9 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
]>
<lolz>&lol9;</lolz>"""

QUADRATIC_BLOWUP = (
    b'<?xml version="1.0"?><!DOCTYPE kaboom [<!ENTITY a "'
    + b"x" * 50_000
    + b'">]><kaboom>'
    + b"&a;" * 5_000
    + b"</kaboom>"
)

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE order [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<order><note>&x;</note></order>"""

PARAMETER_XXE = b"""<?xml version="1.0"?>
<!DOCTYPE order [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>
<order/>"""

EXTERNAL_DTD = b'<?xml version="1.0"?><!DOCTYPE order SYSTEM "http://evil.invalid/o.dtd"><order/>'

INTERNAL_DTD = b'<?xml version="1.0"?><!DOCTYPE order [<!ELEMENT order ANY>]><order/>'


@pytest.mark.parametrize(
    "body",
    [BILLION_LAUGHS, QUADRATIC_BLOWUP, XXE, PARAMETER_XXE, EXTERNAL_DTD, INTERNAL_DTD],
    ids=["billion-laughs", "quadratic-blowup", "xxe", "parameter-xxe", "external-dtd", "dtd"],
)
def test_xml_refuses_dtds_entities_and_external_references(body: bytes) -> None:
    with pytest.raises(UnsafeInputError, match="XML refused") as caught:
        XmlCodec().decode(body)
    assert caught.value.status == 400
    assert "root:" not in str(caught.value)  # nothing of /etc/passwd leaks out


def test_xml_refuses_documents_too_deep_or_too_large() -> None:
    codec = XmlCodec(max_depth=5, max_bytes=1000)
    assert codec.decode(b"<a><b><c><d><e>x</e></d></c></b></a>") == {"b": {"c": {"d": {"e": "x"}}}}
    with pytest.raises(UnsafeInputError, match="deeper than 5"):
        codec.decode(b"<a><b><c><d><e><f>x</f></e></d></c></b></a>")
    with pytest.raises(UnsafeInputError, match="over 1000 bytes"):
        codec.decode(b"<a>" + b"x" * 1000 + b"</a>")
    with pytest.raises(UnsafeInputError, match="deeper than 64"):
        XmlCodec().decode(b"<a>" * 10_000 + b"</a>" * 10_000)
    with pytest.raises(UnsafeInputError, match="deeper than 5"):
        codec.encode({"b": {"c": {"d": {"e": {"f": "x"}}}}})


@pytest.mark.parametrize(
    "body",
    [b"", b"<a>", b"<a></b>", b"<a>&undefined;</a>", b"not xml", b"<a/><b/>", b"<a>\xff</a>"],
)
def test_malformed_xml_is_a_400(body: bytes) -> None:
    with pytest.raises(TranslationError, match="malformed XML") as caught:
        XmlCodec().decode(body)
    assert type(caught.value) is TranslationError
    assert caught.value.status == 400


# XML: properties

NAMES = st.sampled_from(["a", "b", "c", "_x", "x.y", "x-y", "é", "名前", "A9", "xml"])
LIST_NAMES = st.sampled_from(["La", "Lb", "L_c"])  # never used for anything else
XML_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff")
    | st.sampled_from("\t\n\r"),
    max_size=8,
)


def _objects(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    elements = st.dictionaries(NAMES, children, min_size=1, max_size=3)
    return st.builds(
        lambda attributes, elements, lists: {**attributes, **elements, **lists},
        st.dictionaries(NAMES.map("@{}".format), XML_TEXT, max_size=2),
        elements,
        st.dictionaries(LIST_NAMES, st.lists(elements, min_size=1, max_size=2), max_size=1),
    )


XML_DOCUMENTS = _objects(st.recursive(XML_TEXT.filter(bool), _objects, max_leaves=4))


def _list_names(value: Any) -> set[str]:
    if isinstance(value, list):
        return set().union(*map(_list_names, value))
    if isinstance(value, dict):
        names = {key for key, child in value.items() if isinstance(child, list)}
        return names.union(*map(_list_names, value.values()))
    return set()


@settings(max_examples=200, deadline=None)
@given(XML_DOCUMENTS)
def test_xml_round_trips_documents_of_strings_objects_and_lists(doc: dict[str, Any]) -> None:
    codec = XmlCodec(root="doc", lists=_list_names(doc))
    assert codec.decode(codec.encode(doc)) == doc


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | XML_TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.dictionaries(NAMES, children | st.lists(children, max_size=3), max_size=3),
    max_leaves=8,
)
JSON_OBJECTS = st.dictionaries(NAMES, JSON_VALUES | st.lists(JSON_VALUES, max_size=3), max_size=4)


def _as_xml_gives_it_back(value: Any) -> Any:
    """The rule in `XmlCodec`'s docstring: what `decode(encode(value))` returns."""
    if isinstance(value, dict):
        content = {}
        for key, child in value.items():
            if isinstance(child, list):
                items = [_as_xml_gives_it_back(item) for item in child]
                if items:
                    content[key] = items if len(items) > 1 else items[0]
            else:
                content[key] = _as_xml_gives_it_back(child)
        return content or None
    if isinstance(value, bool):
        return "true" if value else "false"
    return None if value is None or value == "" else str(value)


@settings(max_examples=200, deadline=None)
@given(JSON_OBJECTS)
def test_xml_gives_json_documents_back_by_the_documented_rule(doc: dict[str, Any]) -> None:
    codec = XmlCodec()
    assert codec.decode(codec.encode(doc)) == _as_xml_gives_it_back(doc)


# Forms


def test_form_decodes_repeated_and_blank_fields() -> None:
    body = b"sku=KB-1&sku=MS%2D7&note=&name=Ada+Lovelace&city=%C3%85lesund"
    assert FormCodec().decode(body) == {
        "sku": ["KB-1", "MS-7"],
        "note": "",
        "name": "Ada Lovelace",
        "city": "Ålesund",
    }
    assert FormCodec().decode(b"") == {}
    assert FormCodec().decode(b"a.b=1") == {"a.b": "1"}


def test_form_nests_dotted_keys_when_asked() -> None:
    codec = FormCodec(nested=True)
    body = b"customer.name=Ada&customer.tags=a&customer.tags=b&total=3"
    value = {"customer": {"name": "Ada", "tags": ["a", "b"]}, "total": "3"}
    assert codec.decode(body) == value
    assert codec.encode(value) == body
    with pytest.raises(TranslationError) as caught:
        codec.decode(b"a=1&a.b=2")
    assert caught.value.path == "a.b"
    with pytest.raises(TranslationError, match="empty name segment"):
        codec.decode(b"a..b=1")


def test_form_encodes_lists_as_repeated_keys_and_plain_values_as_text() -> None:
    value = {"sku": ["KB 1", "MS&7"], "paid": True, "coupon": None, "qty": 2, "price": 1.5}
    body = FormCodec().encode(value)
    assert body == b"sku=KB+1&sku=MS%267&paid=true&coupon=&qty=2&price=1.5"
    assert FormCodec().decode(body) == {
        "sku": ["KB 1", "MS&7"],
        "paid": "true",
        "coupon": "",
        "qty": "2",
        "price": "1.5",
    }


@pytest.mark.parametrize(
    ("codec", "value", "path"),
    [
        (FormCodec(), {"customer": {"name": "Ada"}}, "customer"),
        (FormCodec(nested=True), {"lines": [{"sku": "A"}]}, "lines"),
        (FormCodec(nested=True), {"a": {"b.c": "x"}}, "a"),
        (FormCodec(), ["not", "an", "object"], None),
    ],
)
def test_form_refuses_what_it_cannot_write(codec: FormCodec, value: Any, path: str | None) -> None:
    with pytest.raises(TranslationError) as caught:
        codec.encode(value)
    assert caught.value.path == path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"a=%zz", "bad percent-escape"),
        (b"a=%4", "bad percent-escape"),
        (b"a=%ff", "not UTF-8"),
        (b"a=\xff", "not UTF-8"),
        (b"a=1&b", "malformed form body"),
    ],
)
def test_form_refuses_bad_encoding(body: bytes, message: str) -> None:
    with pytest.raises(TranslationError, match=message) as caught:
        FormCodec().decode(body)
    assert caught.value.status == 400


def test_form_limits_the_number_of_fields() -> None:
    codec = FormCodec(max_num_fields=3)
    assert codec.decode(b"a=1&b=2&c=3") == {"a": "1", "b": "2", "c": "3"}
    with pytest.raises(UnsafeInputError, match="more than 3 fields"):
        codec.decode(b"a=1&b=2&c=3&d=4")


# Text


def test_text_is_utf8_str_both_ways() -> None:
    assert TextCodec().decode("Grüße".encode()) == "Grüße"
    assert TextCodec().encode("Grüße") == "Grüße".encode()
    with pytest.raises(TranslationError, match="not UTF-8"):
        TextCodec().decode(b"\xff")
    with pytest.raises(TranslationError, match="carries a str"):
        TextCodec().encode({"a": 1})


# Negotiation


@pytest.mark.parametrize(
    ("header", "codec_type"),
    [
        (None, JsonCodec),
        ("", JsonCodec),
        ("  ", JsonCodec),
        ("application/json", JsonCodec),
        ("Application/JSON; Charset=UTF-8", JsonCodec),
        ('application/xml; charset="utf-8"', XmlCodec),
        ("TEXT/XML;charset=us-ascii", XmlCodec),
        ("application/problem+json", JsonCodec),
        ("application/atom+xml", XmlCodec),
        ("application/x-www-form-urlencoded", FormCodec),
        ("text/plain; charset=utf-8", TextCodec),
    ],
)
def test_content_type_picks_the_codec(header: str | None, codec_type: type) -> None:
    assert isinstance(default_registry().for_content_type(header), codec_type)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("application/yaml", "no codec for 'application/yaml'"),
        ("nonsense", "no codec for 'nonsense'"),
        ("text/plain; charset=latin-1", "charset 'latin-1'"),
        ("application/xml; charset=ISO-8859-1", "charset 'ISO-8859-1'"),
    ],
)
def test_unknown_content_type_or_charset_is_a_415(header: str, message: str) -> None:
    with pytest.raises(UnsupportedMediaType, match=message) as caught:
        default_registry().for_content_type(header)
    assert caught.value.status == 415
    assert "supported: application/json, application/xml, text/xml" in str(caught.value)


@pytest.mark.parametrize(
    ("header", "codec_type"),
    [
        (None, JsonCodec),
        ("*/*", JsonCodec),
        ("application/*", JsonCodec),
        ("text/*", TextCodec),
        ("application/xml", XmlCodec),
        ("text/xml", XmlCodec),
        ("application/xml;q=0.9, application/json", JsonCodec),
        ("application/json;q=0.5, application/xml;q=0.8", XmlCodec),
        ("*/*, application/xml", XmlCodec),
        ("application/json;q=0, application/*", XmlCodec),
        ("text/html, application/xhtml+xml, application/xml;q=0.9, */*;q=0.8", XmlCodec),
        ("application/xml;q=bogus, text/plain", TextCodec),
    ],
)
def test_accept_negotiates_by_quality_then_specificity(
    header: str | None, codec_type: type
) -> None:
    assert isinstance(default_registry().for_accept(header), codec_type)


@pytest.mark.parametrize(
    "header", ["image/png", "application/json;q=0, text/*;q=0", "text/xml;q=0"]
)
def test_nothing_acceptable_is_a_406(header: str) -> None:
    with pytest.raises(NotAcceptable, match="nothing acceptable") as caught:
        default_registry().for_accept(header)
    assert caught.value.status == 406
    assert isinstance(caught.value, UnsupportedMediaType)


def test_registry_takes_codecs_only_and_a_later_one_replaces_an_earlier() -> None:
    registry = CodecRegistry(default="application/xml")
    with pytest.raises(ConfigurationError):
        registry.register("application/json")  # type: ignore[arg-type]
    registry.register(XmlCodec(root="a"))
    order = XmlCodec(root="order")
    registry.register(order)
    assert registry.for_content_type(None) is order
    assert registry.media_types == ["application/xml"]


def test_convert_between_formats() -> None:
    body = b'{"id": "A-1", "lines": [{"sku": "X"}, {"sku": "Y"}]}'
    xml = convert(body, "application/json", "application/xml")
    assert xml == (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b"<root><id>A-1</id><lines><sku>X</sku></lines><lines><sku>Y</sku></lines></root>"
    )
    assert orjson.loads(convert(xml, "application/xml", "application/json")) == orjson.loads(body)
    form = convert(
        b'{"sku": ["X", "Y"], "n": 2}', "application/json", "application/x-www-form-urlencoded"
    )
    assert form == b"sku=X&sku=Y&n=2"
    with pytest.raises(UnsupportedMediaType):
        convert(body, "application/json", "application/yaml")
