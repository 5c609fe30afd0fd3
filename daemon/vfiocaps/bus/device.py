"""The ``org.vfiocaps1.Device`` interface: one object per VFIO device."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from dbus_fast import Variant
from dbus_fast.annotations import DBusBool, DBusDouble, DBusStr, DBusUInt64
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from ..engine import DeviceView
from .calls import mapped_errors
from .names import DEVICE_INTERFACE
from .values import (
    PROPERTY_SIGNATURES,
    DBusCapabilities,
    DBusConditionList,
    DBusOptionList,
    DBusStrList,
    DeviceProperties,
    capabilities_from_properties,
    changed_properties,
    device_properties,
    property_value,
)

RefreshHandler = Callable[[str], Awaitable[DBusCapabilities]]


class DeviceInterface(ServiceInterface):
    """A device's identity and capabilities as properties; changes emit PropertiesChanged."""

    # One per device, thousands of them: no per-instance dictionary.
    __slots__ = ("_answer", "_kind", "_refresh", "_values")

    def __init__(self, view: DeviceView, refresh: RefreshHandler) -> None:
        super().__init__(DEVICE_INTERFACE)
        self._values: DeviceProperties = device_properties(view)
        self._kind = view.device.kind.value
        self._answer: DBusCapabilities | None = None
        self._refresh = refresh

    def capabilities(self) -> DBusCapabilities:
        """The GetCapabilities answer for the current values (built once per change)."""
        if self._answer is None:
            self._answer = capabilities_from_properties(self._values, self._kind)
        return self._answer

    def property_variants(self) -> dict[str, Variant]:
        """Every property at once, as GetAll gives them (GetManagedObjects asks this way)."""
        values = self._values
        return {
            name: Variant(signature, property_value(values, name))
            for name, signature in PROPERTY_SIGNATURES.items()
        }

    def update(self, view: DeviceView) -> None:
        """Take a new view and signal the properties that changed."""
        values = device_properties(view)
        changed = changed_properties(self._values, values)
        self._values = values
        if changed:
            self._answer = None
            self.emit_properties_changed(changed)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self._values.Id

    @dbus_property(access=PropertyAccess.READ)
    def Uuid(self) -> DBusStr:
        return self._values.Uuid

    @dbus_property(access=PropertyAccess.READ)
    def SysfsPath(self) -> DBusStr:
        return self._values.SysfsPath

    @dbus_property(access=PropertyAccess.READ)
    def Parent(self) -> DBusStr:
        return self._values.Parent

    @dbus_property(access=PropertyAccess.READ)
    def TypeId(self) -> DBusStr:
        return self._values.TypeId

    @dbus_property(access=PropertyAccess.READ)
    def TypeName(self) -> DBusStr:
        return self._values.TypeName

    @dbus_property(access=PropertyAccess.READ)
    def DeviceApi(self) -> DBusStr:
        return self._values.DeviceApi

    @dbus_property(access=PropertyAccess.READ)
    def Driver(self) -> DBusStr:
        return self._values.Driver

    @dbus_property(access=PropertyAccess.READ)
    def DriverVersion(self) -> DBusStr:
        return self._values.DriverVersion

    @dbus_property(access=PropertyAccess.READ)
    def ProbeState(self) -> DBusStr:
        return self._values.ProbeState

    @dbus_property(access=PropertyAccess.READ)
    def Display(self) -> DBusStr:
        return self._values.Display

    @dbus_property(access=PropertyAccess.READ)
    def GlRequired(self) -> DBusBool:
        return self._values.GlRequired

    @dbus_property(access=PropertyAccess.READ)
    def Migration(self) -> DBusStr:
        return self._values.Migration

    @dbus_property(access=PropertyAccess.READ)
    def MigrationBlockers(self) -> DBusStrList:
        return list(self._values.MigrationBlockers)

    @dbus_property(access=PropertyAccess.READ)
    def MigrationNotes(self) -> DBusStrList:
        return list(self._values.MigrationNotes)

    @dbus_property(access=PropertyAccess.READ)
    def ProbedAt(self) -> DBusUInt64:
        return self._values.ProbedAt

    @dbus_property(access=PropertyAccess.READ)
    def QemuVersion(self) -> DBusStr:
        return self._values.QemuVersion

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> DBusStr:
        return self._values.LastError

    @dbus_property(access=PropertyAccess.READ)
    def MigrationOptions(self) -> DBusOptionList:
        return [list(pair) for pair in self._values.MigrationOptions]

    @dbus_property(access=PropertyAccess.READ)
    def MigrationWithOptions(self) -> DBusStr:
        return self._values.MigrationWithOptions

    @dbus_property(access=PropertyAccess.READ)
    def MigrationStateBytes(self) -> DBusUInt64:
        return self._values.MigrationStateBytes

    @dbus_property(access=PropertyAccess.READ)
    def MigrationSaveSeconds(self) -> DBusDouble:
        return self._values.MigrationSaveSeconds

    @dbus_property(access=PropertyAccess.READ)
    def MigrationLoadSeconds(self) -> DBusDouble:
        return self._values.MigrationLoadSeconds

    @dbus_property(access=PropertyAccess.READ)
    def MigrationFlags(self) -> DBusStrList:
        return list(self._values.MigrationFlags)

    @dbus_property(access=PropertyAccess.READ)
    def DeviceDirtyTracking(self) -> DBusStr:
        return self._values.DeviceDirtyTracking

    @dbus_property(access=PropertyAccess.READ)
    def MigrationConditions(self) -> DBusConditionList:
        return [list(condition) for condition in self._values.MigrationConditions]

    @dbus_property(access=PropertyAccess.READ)
    def GlHost(self) -> DBusStr:
        return self._values.GlHost

    @dbus_property(access=PropertyAccess.READ)
    def GlRenderNode(self) -> DBusStr:
        return self._values.GlRenderNode

    @dbus_property(access=PropertyAccess.READ)
    def GlDetail(self) -> DBusStr:
        return self._values.GlDetail

    @dbus_method()
    @mapped_errors("Device.Refresh")
    async def Refresh(self) -> DBusCapabilities:
        return await self._refresh(self._values.Id)
