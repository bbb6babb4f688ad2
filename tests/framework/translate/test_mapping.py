"""Field mappings: each operation, never touching the input, errors, config, exact reversal."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.errors import ConfigurationError, TranslationError
from framework.translate.mapping import (
    Constant,
    Drop,
    FieldMapping,
    FieldOperation,
    Flatten,
    Nest,
    Pick,
    Rename,
    Template,
    parse_path,
)


def order() -> dict[str, Any]:
    return {
        "id": "A-1",
        "customer": {"first": "Ada", "last": "Lovelace", "address": {"city": "Oslo"}},
        "items": [{"sku": "KB-1", "qty": 2}, {"sku": "MS-7", "qty": 1}],
        "street": "Main St 1",
        "zip": "0150",
        "total": 118.0,
        "paid": True,
        "coupon": None,
    }


def test_paths_parse_into_keys_and_indices() -> None:
    assert parse_path("customer.address.city") == ("customer", "address", "city")
    assert parse_path("items[0].sku") == ("items", 0, "sku")
    assert parse_path("grid[1][-1]") == ("grid", 1, -1)
    for bad in ["", "a..b", ".a", "a.", "[0]", "a[x]", "a]", "a[0]b"]:
        with pytest.raises(ConfigurationError, match="path"):
            parse_path(bad)


def test_rename_moves_a_value_across_nesting() -> None:
    doc = order()
    assert Rename("customer.first", "firstName").apply(doc) == {
        **doc,
        "customer": {"last": "Lovelace", "address": {"city": "Oslo"}},
        "firstName": "Ada",
    }
    assert Rename("id", "order.id").apply({"id": 1}) == {"order": {"id": 1}}
    assert Rename("a", "a.b").apply({"a": 1}) == {"a": {"b": 1}}
    assert Rename("a.b", "a").apply({"a": {"b": 1}}) == {"a": 1}
    assert Rename("items[1].sku", "items[1].code").apply(doc)["items"] == [
        {"sku": "KB-1", "qty": 2},
        {"qty": 1, "code": "MS-7"},
    ]


def test_rename_of_a_missing_source_is_skipped_unless_required() -> None:
    doc = {"a": 1}
    assert Rename("missing", "b").apply(doc) == {"a": 1}
    assert Rename("nowhere.deep", "b").apply(doc) == {"a": 1}
    with pytest.raises(TranslationError, match="'missing' is missing") as caught:
        Rename("missing", "b", required=True).apply(doc)
    assert caught.value.path == "missing"
    assert caught.value.status == 400


def test_drop_removes_a_key_if_it_is_there() -> None:
    assert Drop("customer.address").apply(order())["customer"] == {
        "first": "Ada",
        "last": "Lovelace",
    }
    assert Drop("items[0].qty").apply(order())["items"][0] == {"sku": "KB-1"}
    doc = order()
    assert Drop("nothing.here").apply(doc) is doc


def test_constant_sets_a_fresh_copy_creating_parents() -> None:
    op = Constant("meta.tags", ["a"])
    first, second = op.apply({}), op.apply({})
    assert first == {"meta": {"tags": ["a"]}}
    first["meta"]["tags"].append("changed")
    assert second["meta"]["tags"] == ["a"]
    assert op.value == ["a"]
    assert Constant("id", "new").apply({"id": "old"}) == {"id": "new"}


def test_nest_moves_fields_into_a_sub_object() -> None:
    doc = order()
    nested = Nest(["street", "zip", "country"], "address").apply(doc)
    assert nested["address"] == {"street": "Main St 1", "zip": "0150"}
    assert "street" not in nested
    assert "zip" not in nested
    merged = Nest(["zip"], "customer.address").apply(
        {"customer": {"zip": "1", "address": {"a": 1}}}
    )
    assert merged == {"customer": {"address": {"a": 1, "zip": "1"}}}
    assert Nest(["city"], "addr", prefix="addr_").apply({"addr_city": "Oslo"}) == {
        "addr": {"city": "Oslo"}
    }
    untouched = {"a": 1}
    assert Nest(["x"], "under").apply(untouched) is untouched


def test_flatten_lifts_fields_and_removes_the_emptied_object() -> None:
    doc = {"address": {"street": "Main", "city": "Oslo"}, "id": 1}
    assert Flatten("address").apply(doc) == {"street": "Main", "city": "Oslo", "id": 1}
    assert Flatten("address", ["city"]).apply(doc) == {
        "address": {"street": "Main"},
        "city": "Oslo",
        "id": 1,
    }
    assert Flatten("address", prefix="address_").apply(doc) == {
        "address_street": "Main",
        "address_city": "Oslo",
        "id": 1,
    }
    assert Flatten("customer.address").apply(order())["customer"] == {
        "first": "Ada",
        "last": "Lovelace",
        "city": "Oslo",
    }
    assert Flatten("a").apply({"a": {"a": 1}}) == {"a": 1}


def test_pick_copies_a_value_from_a_path_with_indices() -> None:
    doc = order()
    assert Pick("items[0].sku", "sku").apply(doc)["sku"] == "KB-1"
    assert Pick("items[-1].sku", "last.sku").apply(doc)["last"] == {"sku": "MS-7"}
    assert Pick("items[5].sku", "sku").apply(doc) is doc
    with pytest.raises(TranslationError) as caught:
        Pick("items[5].sku", "sku", required=True).apply(doc)
    assert caught.value.path == "items[5].sku"


def test_picked_objects_are_not_changed_through_their_other_place() -> None:
    doc = {"a": {"x": 1, "y": 2}}
    mapping = FieldMapping([Rename("a.y", "a.z"), Pick("a", "b"), Rename("b.x", "bx")])
    assert mapping.apply(doc) == {"a": {"x": 1, "z": 2}, "b": {"z": 2}, "bx": 1}
    assert doc == {"a": {"x": 1, "y": 2}}


def test_template_builds_a_string_from_fields() -> None:
    doc = order()
    op = Template("label", "{customer.first} {customer.last}: {items[0].sku} x{items[0].qty}")
    assert op.apply(doc)["label"] == "Ada Lovelace: KB-1 x2"
    assert Template("t", "{total:.2f} {{EUR}} {paid} [{coupon}]").apply(doc)["t"] == (
        "118.00 {EUR} true []"
    )
    with pytest.raises(TranslationError, match=r"'customer\.middle' is missing") as caught:
        Template("name", "{customer.first} {customer.middle}").apply(doc)
    assert caught.value.path == "customer.middle"
    with pytest.raises(TranslationError, match="not a plain value"):
        Template("x", "{customer}").apply(doc)
    with pytest.raises(TranslationError, match="'id'"):
        Template("x", "{id:.2f}").apply(doc)


@pytest.mark.parametrize("template", ["{}", "{0!r}", "{a", "a}"])
def test_bad_templates_are_refused_when_built(template: str) -> None:
    with pytest.raises(ConfigurationError, match="template"):
        Template("x", template)


@pytest.mark.parametrize(
    ("op", "path"),
    [
        (Rename("id.x", "y"), "id"),
        (Rename("customer", "id.x"), "id"),
        (Drop("items.sku"), "items"),
        (Constant("customer.first.x", 1), "customer.first"),
        (Constant("items[9].x", 1), "items[9]"),
        (Pick("customer[0]", "x"), "customer"),
        (Pick("id[0]", "x"), "id"),
        (Rename("id[0][0].x", "y"), "id"),
        (Template("x", "{id[1]}"), "id"),
        (Nest(["a"], "id.under"), "id"),
        (Nest(["street"], "zip"), "zip"),
        (Flatten("id"), "id"),
        (Flatten("id.x"), "id"),
    ],
)
def test_paths_through_plain_values_are_refused_naming_where(op: FieldOperation, path: str) -> None:
    with pytest.raises(TranslationError) as caught:
        op.apply(order())
    assert caught.value.path == path


def test_only_objects_can_be_mapped() -> None:
    with pytest.raises(TranslationError, match="applies to an object, not list"):
        FieldMapping([Drop("a")]).apply([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TranslationError):
        Drop("a").apply("text")  # type: ignore[arg-type]


def test_operations_check_their_arguments() -> None:
    with pytest.raises(ConfigurationError, match="list items"):
        Rename("a", "items[0]")
    with pytest.raises(ConfigurationError, match="list items"):
        Drop("items[0]")
    with pytest.raises(ConfigurationError, match="not a plain key"):
        Nest(["a.b"], "c")
    with pytest.raises(ConfigurationError, match="twice"):
        Flatten("c", ["a", "a"])
    with pytest.raises(ConfigurationError, match="inside itself"):
        Nest(["a", "c"], "c")
    with pytest.raises(ConfigurationError, match="onto itself"):
        Flatten("x.pc", ["c"], prefix="p")
    with pytest.raises(ConfigurationError, match="not a FieldOperation"):
        FieldMapping(["drop"])  # type: ignore[list-item]


# Never touching the input, sharing what did not change

EVERYTHING = FieldMapping(
    [
        Rename("customer.first", "customer.given"),
        Rename("customer.given", "firstName"),
        Drop("customer.address.city"),
        Constant("customer.address.country", "NO"),
        Nest(["street", "zip"], "shipping"),
        Flatten("shipping", ["street"], prefix="shipping_"),
        Pick("items[1].sku", "items[0].alt"),
        Template("customer.full", "{firstName} {customer.last}"),
        Rename("items[0].sku", "items[0].code"),
    ]
)


def test_a_mapping_never_changes_its_input() -> None:
    doc = order()
    before = copy.deepcopy(doc)
    inner = {key: id(value) for key, value in doc.items()}
    out = EVERYTHING.apply(doc)
    assert doc == before
    assert {key: id(value) for key, value in doc.items()} == inner
    assert out == {
        "id": "A-1",
        "customer": {
            "last": "Lovelace",
            "address": {"country": "NO"},
            "full": "Ada Lovelace",
        },
        "items": [{"qty": 2, "alt": "MS-7", "code": "KB-1"}, {"sku": "MS-7", "qty": 1}],
        "shipping": {"zip": "0150"},
        "shipping_street": "Main St 1",
        "total": 118.0,
        "paid": True,
        "coupon": None,
        "firstName": "Ada",
    }


def test_a_mapping_shares_what_it_did_not_change() -> None:
    doc = {"keep": {"deep": [1, 2]}, "change": {"x": 1}}
    out = FieldMapping([Rename("change.x", "change.y"), Constant("change.z", 0)]).apply(doc)
    assert out["keep"] is doc["keep"]
    assert out["change"] is not doc["change"]
    assert doc["change"] == {"x": 1}


# Reversal


def test_a_mapping_reverses_op_by_op_in_reverse_order() -> None:
    mapping = FieldMapping(
        [
            Rename("customer.first", "firstName"),
            Nest(["street", "zip"], "address", prefix=""),
            Constant("version", 2),
            Flatten("customer.address", ["city"], prefix="city_"),
        ]
    )
    assert mapping.reversible
    assert mapping.reverse() == FieldMapping(
        [
            Nest(["city"], "customer.address", prefix="city_"),
            Drop("version"),
            Flatten("address", ["street", "zip"]),
            Rename("firstName", "customer.first"),
        ]
    )
    doc = order()
    outside = mapping.apply(doc)
    assert outside["customer"] == {"last": "Lovelace", "city_city": "Oslo"}
    assert mapping.reverse().apply(outside) == doc
    assert not mapping.reverse().reversible  # Drop, the inverse of Constant, has none
    moves = FieldMapping([Rename("a", "b.c"), Nest(["x"], "y", prefix="p")])
    assert moves.reverse().reverse() == moves


@pytest.mark.parametrize(
    ("op", "index"),
    [
        (Drop("x"), 1),
        (Flatten("address"), 1),
        (Pick("a", "b"), 1),
        (Template("a", "{b}"), 1),
    ],
)
def test_reversing_names_the_first_operation_without_an_inverse(
    op: FieldOperation, index: int
) -> None:
    mapping = FieldMapping([Rename("a", "b"), op, Drop("y")])
    assert not mapping.reversible
    assert not op.reversible
    with pytest.raises(
        ConfigurationError, match=re.escape(f"operation {index}, {op!r}, cannot be reversed")
    ):
        mapping.reverse()
    with pytest.raises(ConfigurationError):
        op.reverse()


# Config

CONFIG: list[dict[str, Any]] = [
    {"rename": {"from": "a", "to": "b"}},
    {"rename": {"from": "c", "to": "d", "required": True}},
    {"drop": "x"},
    {"set": {"path": "v", "value": {"n": [1]}}},
    {"nest": {"fields": ["a", "b"], "under": "c"}},
    {"nest": {"fields": ["a"], "under": "c", "prefix": "c_"}},
    {"flatten": {"path": "c", "fields": ["a", "b"]}},
    {"flatten": {"path": "c", "prefix": "c_"}},
    {"pick": {"from": "items[0].sku", "to": "sku"}},
    {"pick": {"from": "a", "to": "b", "required": True}},
    {"template": {"to": "name", "template": "{first} {last}"}},
]


def test_config_builds_the_operations_and_round_trips() -> None:
    mapping = FieldMapping.from_config(CONFIG)
    assert mapping.operations == (
        Rename("a", "b"),
        Rename("c", "d", required=True),
        Drop("x"),
        Constant("v", {"n": [1]}),
        Nest(["a", "b"], "c"),
        Nest(["a"], "c", prefix="c_"),
        Flatten("c", ["a", "b"]),
        Flatten("c", prefix="c_"),
        Pick("items[0].sku", "sku"),
        Pick("a", "b", required=True),
        Template("name", "{first} {last}"),
    )
    assert mapping.to_config() == CONFIG
    assert FieldMapping.from_config(mapping.to_config()) == mapping


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("drop", "expected one {operation: spec} pair"),
        ({"drop": "a", "rename": {}}, "expected one {operation: spec} pair"),
        ({"move": {"from": "a", "to": "b"}}, "unknown operation 'move'; known: rename, drop"),
        ({"rename": {"from": "a"}}, r"\(rename\): misses to"),
        ({"rename": ["a", "b"]}, r"\(rename\): expects an object with from, to"),
        ({"rename": {"from": "a", "to": "b", "force": True}}, "unknown keys force"),
        ({"rename": {"from": "a", "to": 3}}, "to must be a string"),
        ({"rename": {"from": "a", "to": "b", "required": "yes"}}, "required must be true or false"),
        ({"drop": ["a"]}, r"\(drop\): expects a path"),
        ({"drop": "a..b"}, "bad path 'a..b'"),
        ({"set": {"path": "v"}}, "misses value"),
        ({"nest": {"fields": "ab", "under": "c"}}, "fields must be a list"),
        ({"nest": {"fields": [1], "under": "c"}}, "not a plain key name"),
        ({"flatten": {"fields": ["a"]}}, "misses path"),
        ({"pick": {"from": "items[x]", "to": "b"}}, "bad path"),
        ({"template": {"to": "x", "template": "{a!r}"}}, "bad template"),
    ],
)
def test_bad_config_entries_are_named_by_index(entry: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        FieldMapping.from_config([{"drop": "ok"}, entry])
    assert str(caught.value).startswith("mapping entry 1")


def test_config_must_be_a_list() -> None:
    with pytest.raises(ConfigurationError, match="is a list"):
        FieldMapping.from_config({"drop": "a"})


# Property: reversible mappings give the input back exactly

KEYS = ["a", "b", "c", "pa", "pb", "pc"]
FIELDS = ["a", "b", "c"]
SCALARS = st.none() | st.booleans() | st.integers(-5, 5) | st.text("xyz", max_size=3)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=10,
)
DOCUMENTS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5)


def _objects(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """The paths of every object in `value`, through lists too."""
    if isinstance(value, list):
        return [
            found for index, item in enumerate(value) for found in _objects(item, (*path, index))
        ]
    if not isinstance(value, dict):
        return []
    return [path] + [
        found for key, child in value.items() for found in _objects(child, (*path, key))
    ]


def _at(doc: Any, path: tuple[str | int, ...]) -> Any:
    for segment in path:
        doc = doc[segment]
    return doc


def _text(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path).lstrip(".")


@st.composite
def _reversible_operation(draw: st.DrawFn, doc: dict[str, Any]) -> FieldOperation | None:
    """An operation whose inverse restores `doc` exactly (see the mapping module docstring)."""
    objects = _objects(doc)
    kind = draw(st.sampled_from(["rename", "constant", "nest", "flatten"]))
    where = draw(st.sampled_from(objects))
    here = _at(doc, where)
    fresh = [key for key in KEYS if key not in here]
    if kind == "rename":
        sources = [(path, key) for path in objects for key in _at(doc, path)]
        if not sources or not fresh:
            return None
        source = draw(st.sampled_from(sources))
        source_path = (*source[0], source[1])
        if where[: len(source_path)] == source_path:  # the target would be inside the source
            return None
        return Rename(_text(source_path), _text((*where, draw(st.sampled_from(fresh)))))
    if kind == "constant":
        if not fresh:
            return None
        return Constant(_text((*where, draw(st.sampled_from(fresh)))), draw(VALUES))
    prefix = draw(st.sampled_from(["", "p"]))
    fields = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=3))
    if kind == "nest":
        unders = [key for key in fresh if key not in {prefix + name for name in fields}]
        if not unders:
            return None
        return Nest(fields, _text((*where, draw(st.sampled_from(unders)))), prefix)
    inner = [
        (path, key)
        for path in objects
        for key, value in _at(doc, path).items()
        if isinstance(value, dict)
    ]
    if not inner:
        return None
    where, key = draw(st.sampled_from(inner))
    if any(prefix + name in _at(doc, where) for name in fields):  # lifting would overwrite
        return None
    return Flatten(_text((*where, key)), fields, prefix)


@st.composite
def reversible_cases(draw: st.DrawFn) -> tuple[dict[str, Any], FieldMapping, dict[str, Any]]:
    """A document, a reversible mapping valid for it, and the mapped document."""
    doc = draw(DOCUMENTS)
    current, operations = doc, []
    for _ in range(draw(st.integers(1, 6))):
        op = draw(_reversible_operation(current))
        if op is not None:
            operations.append(op)
            current = op.apply(current)
    return doc, FieldMapping(operations), current


@settings(max_examples=200, deadline=None)
@given(reversible_cases())
def test_reversed_mapping_gives_the_document_back(
    case: tuple[dict[str, Any], FieldMapping, dict[str, Any]],
) -> None:
    doc, mapping, expected = case
    before = copy.deepcopy(doc)
    mapped = mapping.apply(doc)
    assert mapped == expected
    assert mapping.reversible
    assert mapping.reverse().apply(mapped) == doc
    assert doc == before
    assert FieldMapping.from_config(mapping.to_config()) == mapping
