"""Turning engine views into D-Bus values: capability dictionaries, type lists, domain parts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature

from ..capabilities import Capabilities, Display, GlHost, Migration
from ..domainxml import DomainParts, Viewer
from ..domainxml import domain_parts as parts_for
from ..engine import DeviceView, ProbeState, TypeView
from ..errors import ProbeBusyError, ProbeError
from ..model import DeviceKind

DBusCapabilities = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
DBusCapabilityList = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
DBusStrList = Annotated[list[str], DBusSignature("as")]
DBusPathList = Annotated[list[str], DBusSignature("ao")]
DBusOptionList = Annotated[list[list[str]], DBusSignature("a(ss)")]
DBusConditionList = Annotated[list[list[str]], DBusSignature("a(ssss)")]
DBusStrDict = Annotated[dict[str, str], DBusSignature("a{ss}")]


@dataclass(frozen=True, slots=True)
class DeviceProperties:
    """The ``org.vfiocaps1.Device`` properties as plain Python values (one per device, so kept
    small: a slotted record rather than a dictionary)."""

    Id: str
    Uuid: str
    SysfsPath: str
    Parent: str
    TypeId: str
    TypeName: str
    DeviceApi: str
    Driver: str
    DriverVersion: str
    ProbeState: str
    Display: str
    GlRequired: bool
    Migration: str
    MigrationBlockers: tuple[str, ...]
    MigrationNotes: tuple[str, ...]
    ProbedAt: int
    QemuVersion: str
    LastError: str
    MigrationOptions: tuple[tuple[str, str], ...]
    MigrationWithOptions: str
    MigrationStateBytes: int
    MigrationSaveSeconds: float
    MigrationLoadSeconds: float
    MigrationFlags: tuple[str, ...]
    DeviceDirtyTracking: str
    MigrationConditions: tuple[tuple[str, str, str, str], ...]
    GlHost: str
    GlRenderNode: str
    GlDetail: str


def device_properties(view: DeviceView) -> DeviceProperties:
    """The ``org.vfiocaps1.Device`` property values of *view*, as plain Python values."""
    device, caps, driver = view.device, view.capabilities, view.driver
    return DeviceProperties(
        Id=device.device_id,
        Uuid=device.device_id if device.kind is DeviceKind.MDEV else "",
        SysfsPath=device.sysfs_path,
        Parent=device.parent,
        TypeId=device.type_id,
        TypeName=view.type_name,
        DeviceApi=device.device_api,
        Driver=driver.module if driver else "",
        DriverVersion=driver.version if driver else "",
        ProbeState=view.state.value,
        Display=(caps.display if caps else Display.UNKNOWN).value,
        GlRequired=bool(caps and caps.gl_required),
        Migration=(caps.migration if caps else Migration.UNKNOWN).value,
        MigrationBlockers=caps.migration_blockers if caps else (),
        MigrationNotes=caps.migration_notes if caps else (),
        ProbedAt=view.probed_at_us if caps else 0,
        QemuVersion=caps.qemu_version if caps else "",
        LastError=view.last_error,
        **_migration_properties(caps),
        GlHost=(caps.gl_host if caps else GlHost.UNKNOWN).value,
        GlRenderNode=caps.gl_render_node if caps else "",
        GlDetail=caps.gl_detail if caps else "",
    )


def _migration_properties(caps: Capabilities | None) -> dict[str, Any]:
    """The migration facts beyond the plain verdict (options, round trip, kernel, conditions)."""
    if caps is None:
        return {
            "MigrationOptions": (),
            "MigrationWithOptions": Migration.UNKNOWN.value,
            "MigrationStateBytes": 0,
            "MigrationSaveSeconds": 0.0,
            "MigrationLoadSeconds": 0.0,
            "MigrationFlags": (),
            "DeviceDirtyTracking": Migration.UNKNOWN.value,
            "MigrationConditions": (),
        }
    tracking = {True: Migration.SUPPORTED, False: Migration.UNSUPPORTED, None: Migration.UNKNOWN}
    return {
        "MigrationOptions": caps.migration_options,
        "MigrationWithOptions": caps.migration_with_options.value,
        "MigrationStateBytes": max(0, caps.migration_state_bytes),
        "MigrationSaveSeconds": caps.migration_save_seconds,
        "MigrationLoadSeconds": caps.migration_load_seconds,
        "MigrationFlags": caps.migration_flags,
        "DeviceDirtyTracking": tracking[caps.device_dirty_tracking].value,
        "MigrationConditions": tuple(
            (c.condition, c.verdict.value, c.decided_by.value, c.reason)
            for c in caps.migration_conditions
        ),
    }


def property_value(properties: DeviceProperties, name: str) -> object:
    """One property in its D-Bus form (arrays as lists)."""
    value = getattr(properties, name)
    if isinstance(value, tuple):
        return [list(item) if isinstance(item, tuple) else item for item in value]
    return value


def changed_properties(old: DeviceProperties, new: DeviceProperties) -> dict[str, object]:
    """The properties whose values differ, in their D-Bus form."""
    return {
        name: property_value(new, name)
        for name in PROPERTY_SIGNATURES
        if getattr(old, name) != getattr(new, name)
    }


PROPERTY_SIGNATURES = {
    "Id": "s",
    "Uuid": "s",
    "SysfsPath": "s",
    "Parent": "s",
    "TypeId": "s",
    "TypeName": "s",
    "DeviceApi": "s",
    "Driver": "s",
    "DriverVersion": "s",
    "ProbeState": "s",
    "Display": "s",
    "GlRequired": "b",
    "Migration": "s",
    "MigrationBlockers": "as",
    "MigrationNotes": "as",
    "ProbedAt": "t",
    "QemuVersion": "s",
    "LastError": "s",
    "MigrationOptions": "a(ss)",
    "MigrationWithOptions": "s",
    "MigrationStateBytes": "t",
    "MigrationSaveSeconds": "d",
    "MigrationLoadSeconds": "d",
    "MigrationFlags": "as",
    "DeviceDirtyTracking": "s",
    "MigrationConditions": "a(ssss)",
    "GlHost": "s",
    "GlRenderNode": "s",
    "GlDetail": "s",
}

_CAPABILITY_KEYS = (
    "Id",
    "TypeId",
    "Driver",
    "DriverVersion",
    "ProbeState",
    "Display",
    "GlRequired",
    "Migration",
    "MigrationBlockers",
    "MigrationNotes",
    "ProbedAt",
    "QemuVersion",
    "LastError",
    "MigrationOptions",
    "MigrationWithOptions",
    "MigrationStateBytes",
    "MigrationSaveSeconds",
    "MigrationLoadSeconds",
    "MigrationFlags",
    "DeviceDirtyTracking",
    "MigrationConditions",
    "GlHost",
    "GlRenderNode",
    "GlDetail",
)


def capabilities_dict(view: DeviceView) -> dict[str, Variant]:
    """The ``a{sv}`` answer of GetCapabilities and Refresh."""
    return capabilities_from_properties(device_properties(view), view.device.kind.value)


def capabilities_from_properties(properties: DeviceProperties, kind: str) -> dict[str, Variant]:
    """The ``a{sv}`` answer built from a device's property values."""
    answer = {
        key: Variant(PROPERTY_SIGNATURES[key], property_value(properties, key))
        for key in _CAPABILITY_KEYS
    }
    answer["Kind"] = Variant("s", kind)
    return answer


def type_dict(view: TypeView) -> dict[str, Variant]:
    """One entry of ListTypes."""
    answer = {
        "Kind": Variant("s", view.kind.value),
        "Parent": Variant("s", view.parent),
        "TypeId": Variant("s", view.type_id),
        "Name": Variant("s", view.name),
        "Description": Variant("s", view.description),
        "DeviceApi": Variant("s", view.device_api),
        "AvailableInstances": Variant("u", max(0, min(view.available_instances, 2**32 - 1))),
        "Instances": Variant("u", view.instances),
        "Driver": Variant("s", view.driver.module if view.driver else ""),
        "DriverVersion": Variant("s", view.driver.version if view.driver else ""),
        "Probed": Variant("b", view.capabilities is not None),
        "Requires": Variant("s", view.requires),
    }
    if view.capabilities is not None:
        answer["Display"] = Variant("s", view.capabilities.display.value)
        answer["GlRequired"] = Variant("b", view.capabilities.gl_required)
        answer["Migration"] = Variant("s", view.capabilities.migration.value)
        answer["MigrationWithOptions"] = Variant(
            "s", view.capabilities.migration_with_options.value
        )
        answer["GlHost"] = Variant("s", view.capabilities.gl_host.value)
    return answer


def domain_parts(view: DeviceView, viewer: Viewer, render_node: Path | None) -> DomainParts:
    """The libvirt domain parts of a device from its probed truth.

    Raises:
        ProbeBusyError: the device is busy and nothing is known of its type yet.
        ProbeError: the device has not been probed successfully.
    """
    caps = view.capabilities
    if caps is None:
        if view.state is ProbeState.BUSY:
            raise ProbeBusyError(f"{view.device.device_id} is in use and its type is not known")
        reason = view.last_error or f"probe state is {view.state.value}"
        raise ProbeError(f"no capabilities for {view.device.device_id}: {reason}")
    return parts_for(view.device, caps, viewer, render_node)
