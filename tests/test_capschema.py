"""The capability schema: every output and the cache follow the one declaration in Capabilities."""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from support.contract import CONTRACT, DOC
from support.engine_rig import driver
from vfiocaps.capabilities import (
    Capabilities,
    Decider,
    Display,
    GlHost,
    Migration,
    MigrationCondition,
)
from vfiocaps.capschema import (
    CAPABILITY_FIELDS,
    DOCUMENT_VERSION,
    DocumentError,
    dbus_values,
    fields_in,
    from_document,
    to_document,
)
from vfiocaps.engine import TypeView
from vfiocaps.fieldspec import Place
from vfiocaps.fingerprint import Fingerprint
from vfiocaps.nfdlabels import LABEL_PREFIX, labels_of

FULL = Capabilities(
    display=Display.DMABUF,
    gl_required=True,
    migration=Migration.UNSUPPORTED,
    migration_blockers=("a blocker",),
    migration_notes=("a note",),
    qemu_version="10.0.3",
    migration_options=(("x-device-dirty-page-tracking", "off"),),
    migration_with_options=Migration.SUPPORTED,
    migration_state_bytes=60,
    migration_save_seconds=0.25,
    migration_load_seconds=0.5,
    migration_flags=("stop-copy",),
    device_dirty_tracking=False,
    migration_conditions=(MigrationCondition("alone", Migration.SUPPORTED, Decider.KERNEL, "r"),),
    gl_host=GlHost.SET_UP,
    gl_render_node="/dev/dri/renderD128",
    gl_detail="set up",
)


def _contract_device_properties() -> dict[str, str]:
    root = ET.fromstring(CONTRACT.read_text())  # noqa: S314 - the repository's own file
    device = next(i for i in root.findall("interface") if i.get("name") == "org.vfiocaps1.Device")
    return {str(p.get("name")): str(p.get("type")) for p in device.findall("property")}


def _get_capabilities_doc() -> str:
    root = ET.fromstring(CONTRACT.read_text())  # noqa: S314 - the repository's own file
    for method in root.iter("method"):
        if method.get("name") == "GetCapabilities":
            for note in method.findall("annotation"):
                if note.get("name") == DOC:
                    return str(note.get("value"))
    raise AssertionError("GetCapabilities has no documentation")


def test_every_field_is_declared_once_with_a_default_when_added_later() -> None:
    names = [item.name for item in CAPABILITY_FIELDS]
    assert len(set(names)) == len(names)
    assert len({item.spec.label for item in CAPABILITY_FIELDS}) == len(names)
    required = [
        f.name for f in dataclasses.fields(Capabilities) if f.default is dataclasses.MISSING
    ]
    assert required == ["display", "gl_required", "migration"]


def test_the_contract_has_every_field_with_its_signature() -> None:
    properties = _contract_device_properties()
    doc = _get_capabilities_doc()
    for item in CAPABILITY_FIELDS:
        assert properties.get(item.name) == item.signature, item.name
        assert re.search(rf"\b{item.name} {re.escape(item.signature)}[,( ]", doc), item.name


def test_document_round_trip_and_defaults_for_fields_added_later() -> None:
    document = to_document(FULL)
    assert from_document(document, DOCUMENT_VERSION) == FULL
    minimal = {"display": "none", "gl_required": False, "migration": "unknown"}
    assert from_document(minimal, DOCUMENT_VERSION) == Capabilities(
        Display.NONE, False, Migration.UNKNOWN
    )


@pytest.mark.parametrize(
    ("change", "version"),
    [
        ({"display": "hologram"}, 1),
        ({"gl_required": "yes"}, 1),
        ({"migration_state_bytes": True}, 1),
        ({"migration_options": [["only-one"]]}, 1),
        ({"migration_conditions": [["a", "supported", "nobody", ""]]}, 1),
        ({"migration_blockers": "not a list"}, 1),
        ({}, DOCUMENT_VERSION + 1),
        ({}, 0),
    ],
)
def test_a_document_that_does_not_match_is_refused(change: dict[str, Any], version: int) -> None:
    with pytest.raises(DocumentError):
        from_document({**to_document(FULL), **change}, version)
    without = {key: value for key, value in to_document(FULL).items() if key != "display"}
    with pytest.raises(DocumentError, match="lacks display"):
        from_document(without, DOCUMENT_VERSION)


def test_dbus_values_of_nothing_known() -> None:
    values = dbus_values(None)
    assert values["Display"] == "unknown"
    assert values["DeviceDirtyTracking"] == "unknown"
    assert values["MigrationOptions"] == []
    assert dbus_values(FULL)["DeviceDirtyTracking"] == "unsupported"
    assert dbus_values(FULL)["MigrationConditions"] == [["alone", "supported", "kernel", "r"]]


def test_labels_and_fingerprint_carry_the_fields_the_schema_places_there() -> None:
    view = TypeView("p", "t", "t", "", "vfio-pci", 1, 0, driver("p"), FULL)
    written = {
        name.rsplit(".", 1)[1] for name in labels_of([view]) if name.startswith(LABEL_PREFIX)
    }
    assert written == {item.attr.replace("_", "-") for item in fields_in(Place.LABELS)}
    carried = {field.name for field in dataclasses.fields(Fingerprint)}
    assert {item.attr for item in fields_in(Place.FINGERPRINT)} <= carried
