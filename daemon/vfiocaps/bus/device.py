"""The ``org.vfiocaps1.Device`` objects: one dispatcher serves the path of every VFIO device.

A library object per device would cost a few kilobytes each in bookkeeping (handler tables,
bound methods, per-bus state) for objects that are all alike. Here a device is a slotted record
of its property values, and one message handler answers ``Properties``, ``Introspectable`` and
``Device.Refresh`` for every path below ``/org/vfiocaps/devices``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast import introspection as intr
from dbus_fast.constants import ArgDirection, ErrorType, PropertyAccess
from dbus_fast.errors import DBusError

from ..engine import DeviceView
from .connection import ManagedInterfaces, ResilientMessageBus
from .errors import to_dbus_error
from .names import (
    DEVICE_INTERFACE,
    DEVICES_PATH,
    INTROSPECTABLE_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    PEER_INTERFACE,
    PROPERTIES_INTERFACE,
)
from .validation import escape_path_element
from .values import (
    PROPERTY_SIGNATURES,
    DBusCapabilities,
    DeviceProperties,
    capabilities_from_properties,
    changed_properties,
    device_properties,
    property_value,
)

RefreshHandler = Callable[[str], Awaitable[DBusCapabilities]]

# Served by the library for every path, exported or not.
LIBRARY_INTERFACES = (PEER_INTERFACE, OBJECT_MANAGER_INTERFACE)
STANDARD_INTERFACES = (PROPERTIES_INTERFACE, INTROSPECTABLE_INTERFACE, *LIBRARY_INTERFACES)
PROPERTIES_SIGNATURES = {"Get": "ss", "GetAll": "s", "Set": "ssv"}
REFRESH = "Refresh"
CAPABILITIES_SIGNATURE = "a{sv}"
DEVICE_PREFIX = DEVICES_PATH + "/"


def device_path(device_id: str) -> str:
    """The object path of the device with *device_id*."""
    return DEVICE_PREFIX + escape_path_element(device_id)


def device_introspection() -> intr.Interface:
    """The interface as introspection shows it (it must equal ``dbus/org.vfiocaps1.xml``)."""
    refresh = intr.Method(
        REFRESH, out_args=[intr.Arg(CAPABILITIES_SIGNATURE, ArgDirection.OUT, "capabilities")]
    )
    properties = [
        intr.Property(name, signature, PropertyAccess.READ)
        for name, signature in PROPERTY_SIGNATURES.items()
    ]
    return intr.Interface(DEVICE_INTERFACE, methods=[refresh], properties=properties)


class DeviceObject:
    """One device's property values, and its GetCapabilities answer built once per change."""

    # Thousands of them: no per-instance dictionary.
    __slots__ = ("_answer", "kind", "values")

    def __init__(self, view: DeviceView) -> None:
        self.values: DeviceProperties = device_properties(view)
        self.kind = view.device.kind.value
        self._answer: DBusCapabilities | None = None

    def capabilities(self) -> DBusCapabilities:
        """The GetCapabilities answer for the current values."""
        if self._answer is None:
            self._answer = capabilities_from_properties(self.values, self.kind)
        return self._answer

    def property_variants(self) -> dict[str, Variant]:
        """Every property at once, as GetAll gives them."""
        values = self.values
        return {
            name: Variant(signature, property_value(values, name))
            for name, signature in PROPERTY_SIGNATURES.items()
        }

    def update(self, view: DeviceView) -> dict[str, Variant]:
        """Take a new view; the properties that changed, as PropertiesChanged carries them."""
        values = device_properties(view)
        changed = changed_properties(self.values, values)
        self.values = values
        if changed:
            self._answer = None
        return {name: Variant(PROPERTY_SIGNATURES[name], value) for name, value in changed.items()}


class DeviceObjects:
    """Every device object, served by one message handler on the bus; what it adds it removes."""

    def __init__(self, bus: ResilientMessageBus, refresh: RefreshHandler) -> None:
        self._bus = bus
        self._refresh = refresh
        self._objects: dict[str, DeviceObject] = {}  # by object path
        self._calls: set[asyncio.Task[None]] = set()
        self._xml: intr.Interface | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Serve calls to device paths and list the devices in introspection and
        GetManagedObjects."""
        self._bus.add_message_handler(self._dispatch)
        self._bus.object_source = self

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called and :meth:`stop` was not since."""
        return self._bus.object_source is self

    def stop(self) -> None:
        """Remove every device (announced) and stop serving. Idempotent."""
        if not self.started:
            return
        try:
            for path in list(self._objects):
                self._remove_path(path)
            for task in list(self._calls):
                task.cancel()
        finally:
            self._bus.object_source = None
            self._bus.remove_message_handler(self._dispatch)

    # ---- the devices ----------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceObject | None:
        """The published device *device_id*, if any."""
        return self._objects.get(device_path(device_id))

    def add(self, view: DeviceView) -> None:
        """Publish a device (or update it, if it is published) and announce it."""
        path = device_path(view.device.device_id)
        if path in self._objects:
            self.update(view)
            return
        device = DeviceObject(view)
        self._objects[path] = device
        if self._bus.announcing:  # only while serving: not before the name is taken
            self._bus.announce_added(path, {DEVICE_INTERFACE: device.property_variants()})

    def update(self, view: DeviceView) -> None:
        """Take a new view of a published device and signal what changed."""
        path = device_path(view.device.device_id)
        device = self._objects.get(path)
        if device is None:
            self.add(view)
            return
        changed = device.update(view)
        if changed and self._bus.connected:
            self._bus.send(
                Message.new_signal(
                    path=path,
                    interface=PROPERTIES_INTERFACE,
                    member="PropertiesChanged",
                    signature="sa{sv}as",
                    body=[DEVICE_INTERFACE, changed, []],
                )
            )

    def remove(self, device_id: str) -> None:
        """Withdraw a device, if published, and announce it."""
        self._remove_path(device_path(device_id))

    def _remove_path(self, path: str) -> None:
        if self._objects.pop(path, None) is not None:
            self._bus.announce_removed(path, [DEVICE_INTERFACE])

    # ---- the bus's object source ----------------------------------------------------------

    def child_names(self, path: str) -> list[str]:
        """Names of the nodes just below *path* that lead to a device (for Introspect)."""
        if not self._objects:
            return []
        if path == DEVICES_PATH:
            return [name[len(DEVICE_PREFIX) :] for name in self._objects]
        prefix = "/" if path == "/" else path + "/"
        if DEVICES_PATH.startswith(prefix):
            return [DEVICES_PATH[len(prefix) :].split("/", 1)[0]]
        return []

    def managed_objects(self, path: str) -> Iterator[tuple[str, ManagedInterfaces]]:
        """The device objects below *path* with their properties, one at a time."""
        prefix = "/" if path == "/" else path + "/"
        if not (DEVICE_PREFIX.startswith(prefix) or prefix.startswith(DEVICE_PREFIX)):
            return
        for object_path, device in list(self._objects.items()):
            if object_path.startswith(prefix):
                yield object_path, {DEVICE_INTERFACE: device.property_variants()}

    # ---- dispatch -------------------------------------------------------------------------

    def _dispatch(self, msg: Message) -> Message | bool | None:
        """A bus message handler: answer calls to device objects; None lets the library go on."""
        path = msg.path or ""
        if msg.message_type is not MessageType.METHOD_CALL or not path.startswith(DEVICE_PREFIX):
            return None
        device = self._objects.get(path)
        if device is None or msg.interface in LIBRARY_INTERFACES:
            return None  # the library's answer: no such object, or Peer and ObjectManager
        expects_reply = not msg.flags & MessageFlag.NO_REPLY_EXPECTED
        is_refresh = msg.interface in (DEVICE_INTERFACE, None) and msg.member == REFRESH
        if is_refresh and not msg.signature:
            self._start_refresh(msg, device, expects_reply)
            return True
        try:
            reply = self._answer(msg, path, device)
        except DBusError as err:
            reply = Message.new_error(msg, err.type, err.text)
        return reply if expects_reply else True

    def _answer(self, msg: Message, path: str, device: DeviceObject) -> Message:
        """The reply to a call other than Refresh.

        Raises:
            DBusError: the standard error for an unknown method, interface or property, or for
                setting a property (they are all read-only).
        """
        member = msg.member or ""
        if (
            msg.interface == PROPERTIES_INTERFACE
            and PROPERTIES_SIGNATURES.get(member) == msg.signature
        ):
            return self._properties(msg, path, device)
        if (
            msg.interface == INTROSPECTABLE_INTERFACE
            and msg.member == "Introspect"
            and not msg.signature
        ):
            return Message.new_method_return(msg, "s", [self._introspect(path)])
        raise DBusError(
            ErrorType.UNKNOWN_METHOD,
            f"{msg.interface or 'no interface'}.{msg.member} with signature "
            f'"{msg.signature}" does not exist on a device object',
        )

    def _properties(self, msg: Message, path: str, device: DeviceObject) -> Message:
        interface = msg.body[0]
        if interface != DEVICE_INTERFACE:
            if interface not in STANDARD_INTERFACES:
                raise DBusError(
                    ErrorType.UNKNOWN_INTERFACE,
                    f'no interface "{interface}" at {path}; the device interface is '
                    f"{DEVICE_INTERFACE}",
                )
            if msg.member == "GetAll":
                return Message.new_method_return(msg, "a{sv}", [{}])
            raise DBusError(
                ErrorType.UNKNOWN_PROPERTY, f'interface "{interface}" has no properties'
            )
        if msg.member == "GetAll":
            return Message.new_method_return(msg, "a{sv}", [device.property_variants()])
        name = msg.body[1]
        signature = PROPERTY_SIGNATURES.get(name)
        if signature is None:
            raise DBusError(
                ErrorType.UNKNOWN_PROPERTY, f'{DEVICE_INTERFACE} has no property "{name}"'
            )
        if msg.member == "Set":
            raise DBusError(
                ErrorType.PROPERTY_READ_ONLY,
                f"{name} is read-only; call Refresh to probe the device again",
            )
        value = Variant(signature, property_value(device.values, name))
        return Message.new_method_return(msg, "v", [value])

    def _introspect(self, path: str) -> str:
        if self._xml is None:
            self._xml = device_introspection()
        node = intr.Node.default(path)
        node.interfaces.append(self._xml)
        return str(node.tostring())

    # ---- Refresh --------------------------------------------------------------------------

    def _start_refresh(self, msg: Message, device: DeviceObject, expects_reply: bool) -> None:
        # The task copies this context, in which the bus noted the caller.
        task = asyncio.get_running_loop().create_task(
            self._serve_refresh(msg, device.values.get("Id"), expects_reply)
        )
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _serve_refresh(self, msg: Message, device_id: str, expects_reply: bool) -> None:
        try:
            answer = await self._refresh(device_id)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - every error becomes a named D-Bus error
            error = to_dbus_error(err, "Device.Refresh")
            reply = Message.new_error(msg, error.type, error.text)
        else:
            reply = Message.new_method_return(msg, CAPABILITIES_SIGNATURE, [answer])
        if expects_reply and self._bus.connected:
            self._bus.send(reply)
