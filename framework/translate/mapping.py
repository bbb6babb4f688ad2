"""Declarative field mappings between two shapes of a JSON-like document, in both directions.

A `FieldMapping` is an ordered list of operations. `apply(doc)` returns a new document and never
changes the one it is given: it copies only the objects on the paths it changes and shares the
rest with the input (so treat both as read-only, or deep-copy). Paths are dotted keys, with list
indices where a value is read or replaced: `customer.address.city`, `items[0].sku`::

    mapping = FieldMapping.from_config([
        {"rename": {"from": "customer.name", "to": "customerName"}},
        {"nest": {"fields": ["street", "city"], "under": "address"}},
        {"set": {"path": "version", "value": 2}},
    ])
    outside = mapping.apply({"customer": {"name": "Ada"}, "street": "Main 1", "city": "Oslo"})
    # {"customer": {}, "customerName": "Ada", "address": {"street": "Main 1", "city": "Oslo"},
    #  "version": 2}
    mapping.reverse().apply(outside)  # the input again

Operations and their inverses (`reverse()`; `FieldMapping.reverse()` inverts them in reverse
order and refuses, naming the first, if one cannot be inverted):

    Rename(source, target)              <-> Rename(target, source)
    Nest(fields, under, prefix)         <-> Flatten(under, fields, prefix)
    Constant(path, value)                -> Drop(path)
    Flatten(path) without fields, Drop, Pick, Template: no inverse

The inverse gives the input back exactly when the forward operation neither overwrote a value
nor created a missing parent object: a Rename's or Constant's target is new but its parent
exists, a Nest's `under` is new (or an object holding other keys), a Flatten lifts no name its
parent already has. Moves leave emptied parents in place, and Flatten removes the sub-object
once it has lifted everything out of it. Missing sources are skipped (`required=True` makes
Rename and Pick refuse them); a path through something that is not an object or list is a
`TranslationError` naming the path. Keys holding `.`, `[` or `]` cannot be addressed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from string import Formatter
from typing import Any, ClassVar, TypeAlias

from framework.errors import ConfigurationError, TranslationError

__all__ = [
    "Constant",
    "Document",
    "Drop",
    "FieldMapping",
    "FieldOperation",
    "Flatten",
    "Nest",
    "Pick",
    "Rename",
    "Template",
    "parse_path",
]

Document: TypeAlias = dict[str, Any]
Path: TypeAlias = tuple[str | int, ...]
_Owned: TypeAlias = dict[int, Any]
"""The containers one `FieldMapping.apply` copied, by id: later operations may change those
in place. Holding them keeps their ids from being reused while the mapping runs."""

_MISSING: Any = object()
_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[-?\d+\])*)")
_INDEX = re.compile(r"\[(-?\d+)\]")


def parse_path(text: str) -> Path:
    """`"items[0].sku"` as `("items", 0, "sku")`; a malformed path is a `ConfigurationError`."""
    if not isinstance(text, str) or not text:
        raise ConfigurationError(f"a path is a non-empty string, not {text!r}")
    path: list[str | int] = []
    for segment in text.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            raise ConfigurationError(f"bad path {text!r}: cannot read segment {segment!r}")
        path.append(match[1])
        path.extend(int(index) for index in _INDEX.findall(match[2]))
    return tuple(path)


def _key_path(text: str) -> Path:
    """A path whose last segment is a key: one that can be set or removed."""
    path = parse_path(text)
    if isinstance(path[-1], int):
        raise ConfigurationError(f"bad path {text!r}: list items cannot be added or removed")
    return path


def _render(path: Path) -> str:
    text = ""
    for segment in path:
        text = f"{text}[{segment}]" if isinstance(segment, int) else f"{text}.{segment}"
    return text.lstrip(".")


def _not_a_container(path: Path, depth: int, node: Any, text: str) -> TranslationError:
    where = _render(path[:depth])
    wanted = "a list" if isinstance(path[depth], int) else "an object"
    return TranslationError(
        f"cannot follow {text!r}: {where} is {type(node).__name__}, not {wanted}", path=where
    )


def _get(doc: Any, path: Path, text: str) -> Any:
    """The value at `path`, or `_MISSING`."""
    # Plain indexing is the fast way, and exact when the path ends with a key: an index that
    # slips into a string is caught by the key after it. Any miss takes the checked way.
    if path and path[-1].__class__ is str:
        try:
            node = doc
            for segment in path:
                node = node[segment]
            return node
        except (KeyError, IndexError, TypeError):
            pass
    return _get_checked(doc, path, text)


def _get_checked(doc: Any, path: Path, text: str) -> Any:
    node = doc
    for depth, segment in enumerate(path):
        if isinstance(segment, str):
            if not isinstance(node, dict):
                raise _not_a_container(path, depth, node, text)
            node = node.get(segment, _MISSING)
            if node is _MISSING:
                return _MISSING
        else:
            if not isinstance(node, list):
                raise _not_a_container(path, depth, node, text)
            if not -len(node) <= segment < len(node):
                return _MISSING
            node = node[segment]
    return node


def _own(node: Any, owned: _Owned) -> Any:
    """`node` itself if this run copied it, else a shallow copy that this run now owns."""
    if id(node) in owned:
        return node
    mine = dict(node) if isinstance(node, dict) else list(node)
    owned[id(mine)] = mine
    return mine


def _owned_path(doc: Document, path: Path, owned: _Owned) -> tuple[Document, Any]:
    """Own every container from the root down to the existing one at `path`."""
    root: Document = _own(doc, owned)
    node: Any = root
    for segment in path:
        child = _own(node[segment], owned)
        node[segment] = child
        node = child
    return root, node


def _set(doc: Document, path: Path, value: Any, owned: _Owned, text: str) -> Document:
    """`doc` with `value` at `path` (a key path), creating missing parent objects."""
    root: Document = _own(doc, owned)
    node: Any = root  # always a dict or list this run owns
    for depth in range(len(path) - 1):
        segment = path[depth]
        try:
            child = node[segment]
        except (KeyError, IndexError, TypeError):
            if isinstance(node, list) and isinstance(segment, int):
                where = _render(path[: depth + 1])
                raise TranslationError(
                    f"cannot set {text!r}: no item {where}", path=where
                ) from None
            if not (isinstance(node, dict) and isinstance(segment, str)):
                raise _not_a_container(path, depth, node, text) from None
            child = {}
            owned[id(child)] = child
        else:
            if not isinstance(child, dict | list):
                raise _not_a_container(path, depth + 1, child, text)
            child = _own(child, owned)
        node[segment] = child
        node = child
    if not isinstance(node, dict):
        raise _not_a_container(path, len(path) - 1, node, text)
    node[path[-1]] = value
    return root


def _remove(doc: Document, path: Path, owned: _Owned, text: str) -> tuple[Document, Any]:
    """`doc` without the key at `path`, and the value removed (or `_MISSING`)."""
    value = _get(doc, path, text)
    if value is _MISSING:
        return doc, _MISSING
    root, parent = _owned_path(doc, path[:-1], owned)
    del parent[path[-1]]
    return root, value


def _parent_object(doc: Document, path: Path, text: str) -> Any:
    """The object holding the key at `path`, or `_MISSING`."""
    parent = _get(doc, path[:-1], text)
    if parent is not _MISSING and not isinstance(parent, dict):
        raise _not_a_container(path, len(path) - 1, parent, text)
    return parent


def _field_names(fields: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(fields, str):
        raise ConfigurationError(f"{what} must be a list of names, not the string {fields!r}")
    names = tuple(fields)
    for name in names:
        if not isinstance(name, str) or not _SEGMENT.fullmatch(name) or "[" in name:
            raise ConfigurationError(f"{what}: {name!r} is not a plain key name")
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{what} name a field twice: {list(names)}")
    return names


class FieldOperation:
    """One step of a `FieldMapping`; subclasses are frozen dataclasses.

    `apply(doc)` returns the changed document without touching `doc`. `reverse()` returns the
    operation that undoes this one, when `reversible`; `to_config()` is the entry
    `FieldMapping.from_config` reads back.
    """

    __slots__ = ()
    config_name: ClassVar[str]

    @property
    def reversible(self) -> bool:
        return False

    def reverse(self) -> FieldOperation:
        raise ConfigurationError(f"{self!r} cannot be reversed")

    def apply(self, doc: Document) -> Document:
        return self._apply(_document(doc), {})

    def _apply(self, doc: Document, owned: _Owned) -> Document:
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: Any) -> FieldOperation:
        """The operation from the value of its config entry (`{"drop": spec}`)."""
        raise NotImplementedError


def _document(doc: Any) -> Document:
    if not isinstance(doc, dict):
        raise TranslationError(f"a field mapping applies to an object, not {type(doc).__name__}")
    return doc


def _spec(spec: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """`spec` checked to be an object with the `required` keys and no unknown ones."""
    if not isinstance(spec, dict):
        raise ConfigurationError(f"expects an object with {', '.join(required)}, not {spec!r}")
    if missing := [key for key in required if key not in spec]:
        raise ConfigurationError(f"misses {', '.join(missing)}")
    if unknown := sorted(set(spec) - {*required, *optional}, key=str):
        raise ConfigurationError(f"has unknown keys {', '.join(map(str, unknown))}")
    return spec


def _flag(spec: dict[str, Any], key: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{key} must be true or false, not {value!r}")
    return value


def _text(spec: dict[str, Any], key: str, default: str | None = None) -> str:
    value = spec.get(key, default)
    if not isinstance(value, str):
        raise ConfigurationError(f"{key} must be a string, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Rename(FieldOperation):
    """Move the value at `source` to `target`, across nesting: `Rename("customer.name",
    "customerName")`. A missing source is skipped, or refused with `required=True`; an
    existing target is overwritten. Inverse: `Rename(target, source)`."""

    source: str
    target: str
    required: bool = False
    _source: Path = field(init=False, repr=False, compare=False)
    _target: Path = field(init=False, repr=False, compare=False)
    config_name: ClassVar[str] = "rename"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_source", _key_path(self.source))
        object.__setattr__(self, "_target", _key_path(self.target))

    @property
    def reversible(self) -> bool:
        return True

    def reverse(self) -> Rename:
        return Rename(self.target, self.source, self.required)

    def _apply(self, doc: Document, owned: _Owned) -> Document:
        doc, value = _remove(doc, self._source, owned, self.source)
        if value is _MISSING:
            if self.required:
                raise TranslationError(f"{self.source!r} is missing", path=self.source)
            return doc
        return _set(doc, self._target, value, owned, self.target)

    def to_config(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"from": self.source, "to": self.target}
        if self.required:
            spec["required"] = True
        return {"rename": spec}

    @classmethod
    def from_spec(cls, spec: Any) -> Rename:
        spec = _spec(spec, ("from", "to"), ("required",))
        return cls(_text(spec, "from"), _text(spec, "to"), _flag(spec, "required"))


@dataclass(frozen=True, slots=True)
class Drop(FieldOperation):
    """Remove the key at `path` if it is there. No inverse: the value is gone."""

    path: str
    _path: Path = field(init=False, repr=False, compare=False)
    config_name: ClassVar[str] = "drop"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_path", _key_path(self.path))

    def _apply(self, doc: Document, owned: _Owned) -> Document:
        return _remove(doc, self._path, owned, self.path)[0]

    def to_config(self) -> dict[str, Any]:
        return {"drop": self.path}

    @classmethod
    def from_spec(cls, spec: Any) -> Drop:
        if not isinstance(spec, str):
            raise ConfigurationError(f"expects a path, not {spec!r}")
        return cls(spec)


@dataclass(frozen=True, slots=True)
class Constant(FieldOperation):
    """Set `path` to `value` (a fresh copy each time), creating missing parent objects.
    Inverse: `Drop(path)`, exact when the path was not there before."""

    path: str
    value: Any
    _path: Path = field(init=False, repr=False, compare=False)
    config_name: ClassVar[str] = "set"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_path", _key_path(self.path))

    @property
    def reversible(self) -> bool:
        return True

    def reverse(self) -> Drop:
        return Drop(self.path)

    def _apply(self, doc: Document, owned: _Owned) -> Document:
        value = self.value
        if isinstance(value, dict | list):
            value = copy.deepcopy(value)
        return _set(doc, self._path, value, owned, self.path)

    def to_config(self) -> dict[str, Any]:
        return {"set": {"path": self.path, "value": self.value}}

    @classmethod
    def from_spec(cls, spec: Any) -> Constant:
        spec = _spec(spec, ("path", "value"))
        return cls(_text(spec, "path"), spec["value"])


@dataclass(frozen=True, slots=True)
class Nest(FieldOperation):
    """Move the keys `prefix + name` of the object holding `under` into the object `under`,
    as `name`: `Nest(["street", "city"], "address")` turns `{"street": .., "city": ..}` into
    `{"address": {"street": .., "city": ..}}`. Missing fields are skipped; `under` is created
    when at least one moves, or merged into. Inverse: `Flatten(under, fields, prefix)`."""

    fields: Sequence[str]
    under: str
    prefix: str = ""
    _under: Path = field(init=False, repr=False, compare=False)
    config_name: ClassVar[str] = "nest"

    def __post_init__(self) -> None:
        names = _field_names(self.fields, "nest fields")
        object.__setattr__(self, "fields", names)
        object.__setattr__(self, "_under", _key_path(self.under))
        if self._under[-1] in {self.prefix + name for name in names}:
            raise ConfigurationError(f"cannot nest {self._under[-1]!r} inside itself")

    @property
    def reversible(self) -> bool:
        return True

    def reverse(self) -> Flatten:
        return Flatten(self.under, self.fields, self.prefix)

    def _apply(self, doc: Document, owned: _Owned) -> Document:
        parent = _parent_object(doc, self._under, self.under)
        if parent is _MISSING:
            return doc
        prefix = self.prefix
        moving = {name: parent[prefix + name] for name in self.fields if prefix + name in parent}
        if not moving:
            return doc
        doc, parent = _owned_path(doc, self._under[:-1], owned)
        for name in moving:
            del parent[prefix + name]
        key = self._under[-1]
        inner = parent.get(key, _MISSING)
        if inner is _MISSING:
            inner = moving
            owned[id(inner)] = inner
        elif isinstance(inner, dict):
            inner = _own(inner, owned)
            inner.update(moving)
        else:
            raise TranslationError(
                f"cannot nest under {self.under!r}: it is {type(inner).__name__}, not an object",
                path=self.under,
            )
        parent[key] = inner
        return doc

    def to_config(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"fields": list(self.fields), "under": self.under}
        if self.prefix:
            spec["prefix"] = self.prefix
        return {"nest": spec}

    @classmethod
    def from_spec(cls, spec: Any) -> Nest:
        spec = _spec(spec, ("fields", "under"), ("prefix",))
        return cls(_names(spec), _text(spec, "under"), _text(spec, "prefix", ""))


def _names(spec: dict[str, Any]) -> list[str]:
    fields = spec["fields"]
    if not isinstance(fields, list):
        raise ConfigurationError(f"fields must be a list of names, not {fields!r}")
    return fields


@dataclass(frozen=True, slots=True)
class Flatten(FieldOperation):
    """Lift keys of the object at `path` into the object holding it, as `prefix + name`:
    `Flatten("address", prefix="address_")` turns `{"address": {"city": ..}}` into
    `{"address_city": ..}`. `fields` limits it to those names; the sub-object is removed once
    it is empty. Reversible only with `fields` (which keys to put back cannot be guessed from
    the prefix: the parent may hold such keys of its own): `Nest(fields, path, prefix)`."""

    path: str
    fields: Sequence[str] | None = None
    prefix: str = ""
    _path: Path = field(init=False, repr=False, compare=False)
    config_name: ClassVar[str] = "flatten"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_path", _key_path(self.path))
        if self.fields is not None:
            names = _field_names(self.fields, "flatten fields")
            object.__setattr__(self, "fields", names)
            if self._path[-1] in {self.prefix + name for name in names}:
                raise ConfigurationError(f"cannot lift {self._path[-1]!r} onto itself")

    @property
    def reversible(self) -> bool:
        return self.fields is not None

    def reverse(self) -> Nest:
        if self.fields is None:
            raise ConfigurationError(f"{self!r} cannot be reversed: it needs its list of fields")
        return Nest(self.fields, self.path, self.prefix)

    def _apply(self, doc: Document, owned: _Owned) -> Document:
        parent = _parent_object(doc, self._path, self.path)
        key = self._path[-1]
        inner = _MISSING if parent is _MISSING else parent.get(key, _MISSING)
        if inner is _MISSING:
            return doc
        if not isinstance(inner, dict):
            raise TranslationError(
                f"cannot flatten {self.path!r}: it is {type(inner).__name__}, not an object",
                path=self.path,
            )
        names = inner if self.fields is None else [name for name in self.fields if name in inner]
        if not names:
            return doc
        lifted = {self.prefix + name: inner[name] for name in names}
        doc, parent = _owned_path(doc, self._path[:-1], owned)
        if len(lifted) == len(inner):
            del parent[key]
        else:
            inner = _own(inner, owned)
            for name in names:
                del inner[name]
            parent[key] = inner
        parent.update(lifted)
        return doc

    def to_config(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"path": self.path}
        if self.fields is not None:
            spec["fields"] = list(self.fields)
        if self.prefix:
            spec["prefix"] = self.prefix
        return {"flatten": spec}

    @classmethod
    def from_spec(cls, spec: Any) -> Flatten:
        spec = _spec(spec, ("path",), ("fields", "prefix"))
        fields = _names(spec) if "fields" in spec else None
        return cls(_text(spec, "path"), fields, _text(spec, "prefix", ""))


@dataclass(frozen=True, slots=True)
class Pick(FieldOperation):
    """Copy the value at `source`, which may index lists (`items[0].sku`), to `target`.
    A missing source is skipped, or refused with `required=True`. No inverse: the value was
    derived, undo it with an explicit `Drop(target)` where that is meant."""

    source: str
    target: str
    required: bool = False
    _source: Path = field(init=False, repr=False, compare=False)
    _target: Path = field(init=False, repr=False, compare=False)
    config_name: ClassVar[str] = "pick"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_source", parse_path(self.source))
        object.__setattr__(self, "_target", _key_path(self.target))

    def _apply(self, doc: Document, owned: _Owned) -> Document:
        value = _get(doc, self._source, self.source)
        if value is _MISSING:
            if self.required:
                raise TranslationError(f"{self.source!r} is missing", path=self.source)
            return doc
        if isinstance(value, dict | list):
            # Now reachable twice: changing it in place would change both places.
            owned.clear()
        return _set(doc, self._target, value, owned, self.target)

    def to_config(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"from": self.source, "to": self.target}
        if self.required:
            spec["required"] = True
        return {"pick": spec}

    @classmethod
    def from_spec(cls, spec: Any) -> Pick:
        spec = _spec(spec, ("from", "to"), ("required",))
        return cls(_text(spec, "from"), _text(spec, "to"), _flag(spec, "required"))


def _template_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Template(FieldOperation):
    """Set `target` to a string built from other fields: `Template("name", "{first} {last}")`.
    Braces hold paths (`{customer.address.city}`, `{items[0].sku}`) and an optional format
    spec (`{total:.2f}`); `{{` and `}}` are literal braces. A missing field is a
    `TranslationError`; None renders as "", booleans as `true`/`false`. No inverse."""

    target: str
    template: str
    _target: Path = field(init=False, repr=False, compare=False)
    _parts: tuple[tuple[str, Path | None, str, str], ...] = field(
        init=False, repr=False, compare=False
    )
    config_name: ClassVar[str] = "template"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_target", _key_path(self.target))
        parts: list[tuple[str, Path | None, str, str]] = []
        try:
            parsed = list(Formatter().parse(self.template))
        except ValueError as exc:
            raise ConfigurationError(f"bad template {self.template!r}: {exc}") from exc
        for literal, name, spec, conversion in parsed:
            if conversion is not None:
                raise ConfigurationError(f"bad template {self.template!r}: no !{conversion}")
            if name == "":
                raise ConfigurationError(f"bad template {self.template!r}: {{}} names no field")
            path = None if name is None else parse_path(name)
            parts.append((literal, path, name or "", spec or ""))
        object.__setattr__(self, "_parts", tuple(parts))

    def _apply(self, doc: Document, owned: _Owned) -> Document:
        pieces = []
        for literal, path, name, spec in self._parts:
            pieces.append(literal)
            if path is None:
                continue
            value = _get(doc, path, name)
            if value is _MISSING:
                raise TranslationError(f"template field {name!r} is missing", path=name)
            if isinstance(value, dict | list):
                raise TranslationError(f"template field {name!r} is not a plain value", path=name)
            try:
                pieces.append(format(value, spec) if spec else _template_text(value))
            except (TypeError, ValueError) as exc:
                raise TranslationError(f"template field {name!r}: {exc}", path=name) from exc
        return _set(doc, self._target, "".join(pieces), owned, self.target)

    def to_config(self) -> dict[str, Any]:
        return {"template": {"to": self.target, "template": self.template}}

    @classmethod
    def from_spec(cls, spec: Any) -> Template:
        spec = _spec(spec, ("to", "template"))
        return cls(_text(spec, "to"), _text(spec, "template"))


_OPERATIONS: dict[str, type[FieldOperation]] = {
    op.config_name: op for op in (Rename, Drop, Constant, Nest, Flatten, Pick, Template)
}


@dataclass(frozen=True, slots=True)
class FieldMapping:
    """Operations applied in order to a document; `reverse()` maps the other way.

    Built in code, `FieldMapping([Rename("a", "b"), Drop("x")])`, or from a config list (YAML)
    with one single-key object per operation::

        - rename: {from: customer.name, to: customerName}      # required: true to insist
        - drop: internalNotes
        - set: {path: version, value: 2}
        - nest: {fields: [street, city], under: address}      # prefix: "" by default
        - flatten: {path: address, fields: [street, city]}    # prefix too; fields optional
        - pick: {from: "items[0].sku", to: sku}
        - template: {to: name, template: "{first} {last}"}
    """

    operations: Sequence[FieldOperation] = ()

    def __post_init__(self) -> None:
        operations = tuple(self.operations)
        for index, op in enumerate(operations):
            if not isinstance(op, FieldOperation):
                raise ConfigurationError(f"operation {index} is not a FieldOperation: {op!r}")
        object.__setattr__(self, "operations", operations)

    def apply(self, doc: Document) -> Document:
        """The mapped document; `doc` is left as it was."""
        doc = _document(doc)
        owned: _Owned = {}
        for op in self.operations:
            doc = op._apply(doc, owned)
        return doc

    @property
    def reversible(self) -> bool:
        return all(op.reversible for op in self.operations)

    def reverse(self) -> FieldMapping:
        """The mapping that undoes this one: each inverse, last operation first."""
        for index, op in enumerate(self.operations):
            if not op.reversible:
                raise ConfigurationError(f"operation {index}, {op!r}, cannot be reversed")
        return FieldMapping([op.reverse() for op in reversed(self.operations)])

    @classmethod
    def from_config(cls, entries: Any) -> FieldMapping:
        """The mapping a config list describes (see the class docstring); a bad entry is a
        `ConfigurationError` naming its index."""
        if not isinstance(entries, list):
            raise ConfigurationError(f"a field mapping config is a list, not {entries!r}")
        operations = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ConfigurationError(
                    f"mapping entry {index}: expected one {{operation: spec}} pair, got {entry!r}"
                )
            [(name, spec)] = entry.items()
            op = _OPERATIONS.get(name)
            if op is None:
                raise ConfigurationError(
                    f"mapping entry {index}: unknown operation {name!r}; "
                    f"known: {', '.join(_OPERATIONS)}"
                )
            try:
                operations.append(op.from_spec(spec))
            except ConfigurationError as exc:
                raise ConfigurationError(f"mapping entry {index} ({name}): {exc}") from exc
        return cls(operations)

    def to_config(self) -> list[dict[str, Any]]:
        """The config list `from_config` reads back into an equal mapping."""
        return [op.to_config() for op in self.operations]
