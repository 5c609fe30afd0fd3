"""The ``org.vfiocaps1.Manager`` interface on ``/org/vfiocaps``."""

# dbus-fast reads the annotations at class creation: keep them real objects, not strings.
import functools
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Concatenate, ParamSpec, Protocol, TypeVar

from dbus_fast.annotations import (
    DBusBool,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt32,
    DBusUInt64,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from .. import __version__
from .calls import mapped_errors
from .names import MANAGER_INTERFACE
from .values import (
    DBusCapabilities,
    DBusCapabilityList,
    DBusPathList,
    DBusStrDict,
    DBusStrList,
)


class ManagerBackend(Protocol):
    """What the Manager interface asks of the adaptor behind it."""

    def require_serving(self, member: str) -> None:
        """Let a call to *member* through only while the daemon serves.

        Raises:
            NotServingError: the daemon is still learning the host, or is stopping.
        """
        ...

    def list_devices(self) -> list[str]: ...

    def get_device(self, device_id: str) -> str: ...

    async def get_capabilities(self, device_id: str) -> DBusCapabilities: ...

    def list_types(self) -> DBusCapabilityList: ...

    async def refresh(self, device_id: str) -> DBusCapabilities: ...

    async def invalidate(self, driver: str) -> int: ...

    async def domain_xml(self, device_id: str) -> str: ...

    async def domain_xml_parts(self, device_id: str, viewer: str) -> dict[str, str]: ...

    async def probe_type(self, parent: str, type_id: str) -> DBusCapabilities: ...

    async def migration_fingerprint(self, device_id: str) -> str: ...

    async def check_migration(
        self, fingerprint: str, device_id: str
    ) -> tuple[str, list[tuple[str, str, str]]]: ...

    async def hold_devices(self, domain: str, name: str, devices: list[str]) -> list[str]: ...

    async def release_devices(self, domain: str) -> list[str]: ...


@dataclass(frozen=True)
class ManagerState:
    """The Manager's property values."""

    qemu_binary: str = ""
    qemu_version: str = ""
    kernel_release: str = ""
    kvm_available: bool = False
    probing: bool = False
    device_count: int = 0
    probe_count: int = 0
    cache_state: str = "ok"
    emulated: bool = False
    run_state: str = "starting"


_PROPERTY_NAMES = {
    "qemu_binary": "QemuBinary",
    "qemu_version": "QemuVersion",
    "kernel_release": "KernelRelease",
    "kvm_available": "KvmAvailable",
    "probing": "Probing",
    "device_count": "DeviceCount",
    "probe_count": "ProbeCount",
    "cache_state": "CacheState",
    "emulated": "Emulated",
    "run_state": "RunState",
}

P = ParamSpec("P")
R = TypeVar("R")
Served = Callable[Concatenate["ManagerInterface", P], Coroutine[Any, Any, R]]


def served(member: str) -> Callable[[Served[P, R]], Served[P, R]]:
    """Decorate a Manager method: answered only while the daemon serves (NotReady while it
    learns the host, ShuttingDown once it stops), every error mapped to its D-Bus name."""

    def decorate(fn: Served[P, R]) -> Served[P, R]:
        @functools.wraps(fn)
        async def guarded(self: "ManagerInterface", /, *args: P.args, **kwargs: P.kwargs) -> R:
            self.backend.require_serving(member)
            return await fn(self, *args, **kwargs)

        return mapped_errors(member)(guarded)

    return decorate


class ManagerInterface(ServiceInterface):
    """Daemon-wide facts and queries; a thin translation onto a :class:`ManagerBackend`."""

    def __init__(self, backend: ManagerBackend, qemu_binary: str) -> None:
        super().__init__(MANAGER_INTERFACE)
        self.backend = backend
        self._state = ManagerState(qemu_binary=qemu_binary)

    def update(self, state: ManagerState) -> None:
        """Take new property values and signal those that changed."""
        old, new = asdict(self._state), asdict(state)
        self._state = state
        changed = {_PROPERTY_NAMES[k]: v for k, v in new.items() if old[k] != v}
        if changed:
            self.emit_properties_changed(changed)

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def QemuBinary(self) -> DBusStr:
        return self._state.qemu_binary

    @dbus_property(access=PropertyAccess.READ)
    def QemuVersion(self) -> DBusStr:
        return self._state.qemu_version

    @dbus_property(access=PropertyAccess.READ)
    def KernelRelease(self) -> DBusStr:
        return self._state.kernel_release

    @dbus_property(access=PropertyAccess.READ)
    def KvmAvailable(self) -> DBusBool:
        return self._state.kvm_available

    @dbus_property(access=PropertyAccess.READ)
    def Probing(self) -> DBusBool:
        return self._state.probing

    @dbus_property(access=PropertyAccess.READ)
    def DeviceCount(self) -> DBusUInt32:
        return self._state.device_count

    @dbus_property(access=PropertyAccess.READ)
    def ProbeCount(self) -> DBusUInt64:
        return self._state.probe_count

    @dbus_property(access=PropertyAccess.READ)
    def CacheState(self) -> DBusStr:
        return self._state.cache_state

    @dbus_property(access=PropertyAccess.READ)
    def Emulated(self) -> DBusBool:
        return self._state.emulated

    @dbus_property(access=PropertyAccess.READ)
    def RunState(self) -> DBusStr:
        return self._state.run_state

    @dbus_method()
    @served("ListDevices")
    async def ListDevices(self) -> DBusPathList:
        return self.backend.list_devices()

    @dbus_method()
    @served("GetDevice")
    async def GetDevice(self, id: DBusStr) -> DBusObjectPath:
        return self.backend.get_device(id)

    @dbus_method()
    @served("GetCapabilities")
    async def GetCapabilities(self, id: DBusStr) -> DBusCapabilities:
        return await self.backend.get_capabilities(id)

    @dbus_method()
    @served("ListTypes")
    async def ListTypes(self) -> DBusCapabilityList:
        return self.backend.list_types()

    @dbus_method()
    @served("Refresh")
    async def Refresh(self, id: DBusStr) -> DBusCapabilities:
        return await self.backend.refresh(id)

    @dbus_method()
    @served("Invalidate")
    async def Invalidate(self, driver: DBusStr) -> DBusUInt32:
        return await self.backend.invalidate(driver)

    @dbus_method()
    @served("ProbeType")
    async def ProbeType(self, parent: DBusStr, type_id: DBusStr) -> DBusCapabilities:
        return await self.backend.probe_type(parent, type_id)

    @dbus_method()
    @served("DomainXml")
    async def DomainXml(self, id: DBusStr) -> DBusStr:
        return await self.backend.domain_xml(id)

    @dbus_method()
    @served("DomainXmlParts")
    async def DomainXmlParts(self, id: DBusStr, viewer: DBusStr) -> DBusStrDict:
        return await self.backend.domain_xml_parts(id, viewer)

    @dbus_method()
    @served("MigrationFingerprint")
    async def MigrationFingerprint(self, id: DBusStr) -> DBusStr:
        return await self.backend.migration_fingerprint(id)

    @dbus_method()
    @served("CheckMigration")
    async def CheckMigration(
        self, fingerprint: DBusStr, id: DBusStr
    ) -> Annotated[tuple[str, list[tuple[str, str, str]]], DBusSignature("sa(sss)")]:
        return await self.backend.check_migration(fingerprint, id)

    @dbus_method()
    @served("HoldDevices")
    async def HoldDevices(
        self, domain_uuid: DBusStr, domain_name: DBusStr, devices: DBusStrList
    ) -> DBusStrList:
        return await self.backend.hold_devices(domain_uuid, domain_name, devices)

    @dbus_method()
    @served("ReleaseDevices")
    async def ReleaseDevices(self, domain_uuid: DBusStr) -> DBusStrList:
        return await self.backend.release_devices(domain_uuid)

    @dbus_signal()
    def CacheInvalidated(
        self, driver: DBusStr, old_version: DBusStr, new_version: DBusStr, records: DBusUInt32
    ) -> Annotated[tuple[str, str, str, int], DBusSignature("sssu")]:
        return (driver, old_version, new_version, records)


def _name_signal_arguments(signal: object, names: tuple[str, ...]) -> None:
    """Give a signal's arguments their contract names in the introspection data.

    dbus-fast derives a signal's arguments from its return annotation, which carries types but
    no names; consumers (and the contract) see the names.
    """
    arguments = signal.__dict__["__DBUS_SIGNAL"].introspection.args
    for argument, name in zip(arguments, names, strict=True):
        argument.name = name


_name_signal_arguments(
    ManagerInterface.CacheInvalidated, ("driver", "old_version", "new_version", "records")
)
