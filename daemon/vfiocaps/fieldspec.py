"""How one capability field is declared: its D-Bus name and signature, its label, where it shows."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, dataclass_transform

SPEC_KEY = "vfiocaps"
T = TypeVar("T")


class Place(enum.Flag):
    """Where a capability field appears besides the Device property, the GetCapabilities and
    Refresh answer, ``vfiocapsctl probe``, and the cache (every field is in all of those)."""

    NONE = 0
    TYPE_SUMMARY = enum.auto()  # the entry of a probed type in ListTypes
    FINGERPRINT = enum.auto()  # the migration fingerprint (fingerprint.py reads it)
    LABELS = enum.auto()  # the NFD labels (nfdlabels.py writes it)
    EVIDENCE = enum.auto()  # a row of its own under "Why" in ``vfiocapsctl show``


@dataclass(frozen=True, slots=True)
class Spec:
    """The declaration of one field: ``name`` is its D-Bus property name and its JSON name in
    every output; ``label`` is what ``vfiocapsctl show`` calls it; ``to_dbus``, when given,
    turns the field's plain value (enums as their values, tuples as lists) into the D-Bus one."""

    name: str
    signature: str
    label: str
    doc: str
    places: Place = Place.NONE
    to_dbus: Callable[[Any], Any] | None = None


def spec(
    name: str,
    signature: str,
    label: str,
    doc: str,
    places: Place = Place.NONE,
    *,
    default: Any = dataclasses.MISSING,
    to_dbus: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field of :class:`~vfiocaps.capabilities.Capabilities` with its declaration."""
    declared = Spec(name, signature, label, doc, places, to_dbus)
    return dataclasses.field(default=default, metadata={SPEC_KEY: declared})


@dataclass_transform(frozen_default=True, field_specifiers=(spec,))
def schema_record(cls: type[T]) -> type[T]:
    """Make *cls* a frozen, slotted dataclass whose fields are declared with :func:`spec`."""
    return dataclasses.dataclass(frozen=True, slots=True)(cls)
