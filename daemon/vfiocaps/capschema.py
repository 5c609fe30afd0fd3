"""The capability schema, read from Capabilities: D-Bus values, JSON and the cached document."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .capabilities import Capabilities
from .fieldspec import SPEC_KEY, Place, Spec

DOCUMENT_VERSION = 1
"""The version of the cache's capability document. Adding a field (with its default) keeps it;
renaming or re-typing one raises it, with an upgrade in :data:`_UPGRADES`."""

Decoder = Callable[[Any], Any]


class DocumentError(ValueError):
    """A cached capability document that does not match the schema."""


@dataclass(frozen=True, slots=True)
class CapabilityField:
    """One field of the schema: the attribute ``attr`` of :class:`Capabilities` and its spec."""

    attr: str
    spec: Spec
    decode: Decoder
    absent: Any  # the plain value when nothing is known (no capabilities)

    @property
    def name(self) -> str:
        """The D-Bus property name, also the field's name in every JSON output."""
        return self.spec.name

    @property
    def signature(self) -> str:
        return self.spec.signature

    def plain(self, caps: Capabilities | None) -> Any:
        """The field of *caps* as JSON values (enums as values, tuples as lists)."""
        return plain(getattr(caps, self.attr) if caps is not None else self.absent)

    def dbus(self, caps: Capabilities | None) -> Any:
        """The field of *caps* as its D-Bus property value."""
        value = self.plain(caps)
        convert = self.spec.to_dbus
        return value if convert is None else convert(value)


def plain(value: Any) -> Any:
    """*value* as JSON values: enums by value, tuples and records as lists. Raises nothing."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [plain(getattr(value, item.name)) for item in dataclasses.fields(value)]
    if isinstance(value, tuple):
        return [plain(item) for item in value]
    return value


def _scalar(kind: type) -> Decoder:
    def decode(value: Any) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DocumentError(f"expected {kind.__name__}, found {value!r}")
        return value

    return decode


def _enum(kind: type[enum.Enum]) -> Decoder:
    def decode(value: Any) -> Any:
        try:
            return kind(value)
        except ValueError as err:
            raise DocumentError(f"no {kind.__name__} {value!r}") from err

    return decode


def _sequence(value: Any, length: int | None) -> list[Any]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise DocumentError(f"expected a list{'' if length is None else f' of {length}'}")
    return value


def decoder(hint: Any) -> Decoder:
    """A strict decoder from JSON values to the Python type *hint*.

    Raises:
        TypeError: the schema uses a type this module cannot store (a programming error).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (str, int, float, bool):
        return _scalar(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        parts = [decoder(hints[item.name]) for item in dataclasses.fields(hint)]
        record = hint
        return lambda value: record(
            *(part(item) for part, item in zip(parts, _sequence(value, len(parts)), strict=True))
        )
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item_decoder = decoder(args[0])
        return lambda value: tuple(item_decoder(item) for item in _sequence(value, None))
    if origin is tuple:
        parts = [decoder(arg) for arg in args]
        return lambda value: tuple(
            part(item) for part, item in zip(parts, _sequence(value, len(parts)), strict=True)
        )
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (other,) = (arg for arg in args if arg is not type(None))
        inner = decoder(other)
        return lambda value: None if value is None else inner(value)
    raise TypeError(f"the capability schema cannot store {hint!r}")


def _fields() -> tuple[CapabilityField, ...]:
    hints = typing.get_type_hints(Capabilities)
    absent = {"display": "unknown", "gl_required": False, "migration": "unknown"}
    found = []
    for item in dataclasses.fields(Capabilities):
        declared = item.metadata.get(SPEC_KEY)
        if not isinstance(declared, Spec):
            raise TypeError(f"Capabilities.{item.name} has no spec")
        decode = decoder(hints[item.name])
        default = item.default
        if default is dataclasses.MISSING:
            default = decode(absent[item.name])
        found.append(CapabilityField(item.name, declared, decode, default))
    return tuple(found)


CAPABILITY_FIELDS: tuple[CapabilityField, ...] = _fields()
"""Every capability field, in declaration order."""

REQUIRED = frozenset(
    item.name for item in dataclasses.fields(Capabilities) if item.default is dataclasses.MISSING
)


def fields_in(place: Place) -> tuple[CapabilityField, ...]:
    """The fields that appear in *place*."""
    return tuple(item for item in CAPABILITY_FIELDS if place in item.spec.places)


def dbus_values(caps: Capabilities | None) -> dict[str, Any]:
    """Every capability field as D-Bus values, by D-Bus name (absent values when *caps* is
    ``None``): the form of every JSON output too."""
    return {item.name: item.dbus(caps) for item in CAPABILITY_FIELDS}


def to_document(caps: Capabilities) -> dict[str, Any]:
    """*caps* as the cache's document (version :data:`DOCUMENT_VERSION`), keyed by attribute."""
    return {item.attr: item.plain(caps) for item in CAPABILITY_FIELDS}


# Upgrades of older documents: _UPGRADES[v] turns a version v document into version v + 1.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def from_document(document: Mapping[str, Any], version: int) -> Capabilities:
    """The capabilities a cached document of *version* holds. A field the document lacks takes
    its default (it was added after the document was written); unknown keys are ignored.

    Raises:
        DocumentError: the document is newer than this schema, or does not match it.
    """
    if not isinstance(document, Mapping):
        raise DocumentError("the capability document is not an object")
    if version > DOCUMENT_VERSION or version < 1:
        raise DocumentError(f"capability document version {version} (this daemon reads 1 to "
                            f"{DOCUMENT_VERSION})")  # fmt: skip
    values = dict(document)
    for step in range(version, DOCUMENT_VERSION):
        values = _UPGRADES[step](values)
    missing = REQUIRED - values.keys()
    if missing:
        raise DocumentError(f"the capability document lacks {', '.join(sorted(missing))}")
    arguments = {}
    for item in CAPABILITY_FIELDS:
        if item.attr in values:
            try:
                arguments[item.attr] = item.decode(values[item.attr])
            except DocumentError as err:
                raise DocumentError(f"{item.attr}: {err}") from err
    return Capabilities(**arguments)
