"""Turning engine views into D-Bus values: capability dictionaries, type lists, domain parts."""

from __future__ import annotations

from typing import Annotated, Any

from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature

from ..capschema import CAPABILITY_FIELDS, fields_in
from ..engine import DeviceView, TypeView
from ..fieldspec import Place
from ..model import DeviceKind

DBusCapabilities = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
DBusCapabilityList = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
DBusStrList = Annotated[list[str], DBusSignature("as")]
DBusPathList = Annotated[list[str], DBusSignature("ao")]
DBusOptionList = Annotated[list[list[str]], DBusSignature("a(ss)")]
DBusConditionList = Annotated[list[list[str]], DBusSignature("a(ssss)")]
DBusStrDict = Annotated[dict[str, str], DBusSignature("a{ss}")]


# The properties of a device that are not capabilities, with their signatures. The capability
# properties follow, from the schema (:mod:`vfiocaps.capschema`).
_DEVICE_SIGNATURES = {
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
    "ProbedAt": "t",
    "LastError": "s",
}
PROPERTY_SIGNATURES = {
    **_DEVICE_SIGNATURES,
    **{item.name: item.signature for item in CAPABILITY_FIELDS},
}
_INDEX = {name: index for index, name in enumerate(PROPERTY_SIGNATURES)}
# GetCapabilities answers every capability and these device properties (and Kind).
_ANSWER_DEVICE_KEYS = ("Id", "TypeId", "Driver", "DriverVersion", "ProbeState", "ProbedAt",
                       "LastError")  # fmt: skip
_CAPABILITY_KEYS = (*_ANSWER_DEVICE_KEYS, *(item.name for item in CAPABILITY_FIELDS))


class DeviceProperties:
    """The ``org.vfiocaps1.Device`` property values of one device, in their D-Bus form (one
    per device, so kept small: one tuple in the order of :data:`PROPERTY_SIGNATURES`)."""

    __slots__ = ("values",)

    def __init__(self, values: tuple[Any, ...]) -> None:
        self.values = values

    def get(self, name: str) -> Any:
        """The value of property *name*.

        Raises:
            KeyError: there is no such property.
        """
        return self.values[_INDEX[name]]


def device_properties(view: DeviceView) -> DeviceProperties:
    """The ``org.vfiocaps1.Device`` property values of *view*."""
    device, caps, driver = view.device, view.capabilities, view.driver
    values = (
        device.device_id,
        device.device_id if device.kind is DeviceKind.MDEV else "",
        device.sysfs_path,
        device.parent,
        device.type_id,
        view.type_name,
        device.device_api,
        driver.module if driver else "",
        driver.version if driver else "",
        view.state.value,
        view.probed_at_us if caps else 0,
        view.last_error,
        *(item.dbus(caps) for item in CAPABILITY_FIELDS),
    )
    return DeviceProperties(values)


def property_value(properties: DeviceProperties, name: str) -> object:
    """One property in its D-Bus form."""
    return properties.get(name)


def changed_properties(old: DeviceProperties, new: DeviceProperties) -> dict[str, object]:
    """The properties whose values differ, in their D-Bus form."""
    return {
        name: value
        for name, before, value in zip(PROPERTY_SIGNATURES, old.values, new.values, strict=True)
        if before != value
    }


def capabilities_dict(view: DeviceView) -> dict[str, Variant]:
    """The ``a{sv}`` answer of GetCapabilities and Refresh."""
    return capabilities_from_properties(device_properties(view), view.device.kind.value)


def capabilities_from_properties(properties: DeviceProperties, kind: str) -> dict[str, Variant]:
    """The ``a{sv}`` answer built from a device's property values."""
    answer = {
        key: Variant(PROPERTY_SIGNATURES[key], properties.get(key)) for key in _CAPABILITY_KEYS
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
        "Probed": Variant("b", view.answer is not None),
        "Requires": Variant("s", view.requires),
    }
    if (learned := view.answer) is not None:
        for item in fields_in(Place.TYPE_SUMMARY):
            answer[item.name] = Variant(item.signature, item.dbus(learned.capabilities))
    return answer
