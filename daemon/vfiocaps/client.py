"""A small asyncio client of the org.vfiocaps D-Bus API, and the formatting vfiocapsctl prints."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from .bus.names import (
    BUS_NAME,
    DEVICE_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
)
from .errors import BusError, VfiocapsError

# The most changes monitor holds unread before it gives up rather than grow without bound.
_MONITOR_BACKLOG = 10_000
# The bus's answers to a call on a name nobody owns.
_DAEMON_AWAY = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)


class ClientError(VfiocapsError):
    """The daemon answered a call with an error (``name`` is the D-Bus error name)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{message} ({name})" if message else name)
        self.name = name
        self.message = message


def plain(value: Any) -> Any:
    """Unwrap variants recursively into JSON-friendly values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


class VfiocapsClient:
    """Calls on org.vfiocaps over an already connected bus."""

    def __init__(self, bus: MessageBus, timeout: float = 120.0, ask_password: bool = False) -> None:
        """*ask_password*: let polkit ask the user to authenticate for calls that change state
        (D-Bus's ALLOW_INTERACTIVE_AUTHORIZATION flag), as from a terminal."""
        self._bus = bus
        self._timeout = timeout
        self._ask_password = ask_password

    async def _call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        interactive: bool = False,
    ) -> list[Any]:
        message = Message(
            destination=BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
            if interactive and self._ask_password
            else MessageFlag.NONE,
        )
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._bus.call(message)
        except TimeoutError as err:
            raise ClientError("timeout", f"no answer to {member} in {self._timeout:g}s") from err
        if reply is None:
            raise ClientError("no-reply", f"no reply to {member}")
        if reply.message_type is MessageType.ERROR:
            detail = str(reply.body[0]) if reply.body else ""
            raise ClientError(reply.error_name or "error", detail)
        return list(reply.body)

    async def manager_properties(self) -> dict[str, Any]:
        """All Manager properties.

        Raises:
            ClientError: the daemon is not there or refused.
        """
        (values,) = await self._call(
            ROOT_PATH, PROPERTIES_INTERFACE, "GetAll", "s", [MANAGER_INTERFACE]
        )
        return dict(plain(values))

    async def devices(self) -> list[dict[str, Any]]:
        """Every device's properties, sorted by id.

        Raises:
            ClientError: the daemon is not there or refused.
        """
        (objects,) = await self._call(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
        found = [
            dict(plain(interfaces[DEVICE_INTERFACE]))
            for interfaces in objects.values()
            if DEVICE_INTERFACE in interfaces
        ]
        return sorted(found, key=lambda device: str(device.get("Id", "")))

    async def device(self, device_id: str) -> dict[str, Any]:
        """One device's properties (waiting for a pending probe, as GetCapabilities does).

        Raises:
            ClientError: unknown or malformed id, or the daemon is not there.
        """
        await self._call(ROOT_PATH, MANAGER_INTERFACE, "GetCapabilities", "s", [device_id])
        (path,) = await self._call(ROOT_PATH, MANAGER_INTERFACE, "GetDevice", "s", [device_id])
        (values,) = await self._call(path, PROPERTIES_INTERFACE, "GetAll", "s", [DEVICE_INTERFACE])
        return dict(plain(values))

    async def types(self) -> list[dict[str, Any]]:
        """ListTypes.

        Raises:
            ClientError: the daemon is not there or refused.
        """
        (types,) = await self._call(ROOT_PATH, MANAGER_INTERFACE, "ListTypes")
        return [dict(plain(entry)) for entry in types]

    async def refresh(self, device_id: str) -> dict[str, Any]:
        """Refresh (needs authorisation).

        Raises:
            ClientError: not authorised, unknown id, or the probe failed.
        """
        (answer,) = await self._call(
            ROOT_PATH, MANAGER_INTERFACE, "Refresh", "s", [device_id], interactive=True
        )
        return dict(plain(answer))

    async def invalidate(self, driver: str) -> int:
        """Invalidate (needs authorisation).

        Raises:
            ClientError: not authorised or a malformed driver name.
        """
        (count,) = await self._call(
            ROOT_PATH, MANAGER_INTERFACE, "Invalidate", "s", [driver], interactive=True
        )
        return int(count)

    async def probe_type(self, parent: str, type_id: str) -> dict[str, Any]:
        """ProbeType (needs authorisation): the type as ListTypes describes it.

        Raises:
            ClientError: not authorised, unknown parent or type, or the probe failed.
        """
        (answer,) = await self._call(
            ROOT_PATH, MANAGER_INTERFACE, "ProbeType", "ss", [parent, type_id], interactive=True
        )
        return dict(plain(answer))

    async def domain_xml(self, device_id: str) -> str:
        """DomainXml.

        Raises:
            ClientError: unknown id, or the device has no capabilities yet.
        """
        (xml,) = await self._call(ROOT_PATH, MANAGER_INTERFACE, "DomainXml", "s", [device_id])
        return str(xml)

    async def domain_xml_parts(self, device_id: str, viewer: str = "") -> dict[str, str]:
        """DomainXmlParts: the libvirt parts by name, for a ``local`` or ``remote`` viewer.

        Raises:
            ClientError: unknown id or viewer, or the device has no capabilities yet.
        """
        (parts,) = await self._call(
            ROOT_PATH, MANAGER_INTERFACE, "DomainXmlParts", "ss", [device_id, viewer]
        )
        return {str(name): str(value) for name, value in dict(parts).items()}

    async def migration_fingerprint(self, device_id: str) -> str:
        """MigrationFingerprint: the device type's fingerprint as JSON.

        Raises:
            ClientError: unknown id, or the device has no capabilities yet.
        """
        (document,) = await self._call(
            ROOT_PATH, MANAGER_INTERFACE, "MigrationFingerprint", "s", [device_id]
        )
        return str(document)

    async def check_migration(
        self, fingerprint: str, device_id: str = ""
    ) -> tuple[str, list[tuple[str, str, str]]]:
        """CheckMigration: (verdict, [(field, verdict, detail), ...]).

        Raises:
            ClientError: not a fingerprint, unknown id, or no capabilities yet.
        """
        verdict, reasons = await self._call(
            ROOT_PATH, MANAGER_INTERFACE, "CheckMigration", "ss", [fingerprint, device_id]
        )
        return str(verdict), [(str(a), str(b), str(c)) for a, b, c in reasons]

    async def changes(self) -> AsyncIterator[dict[str, Any]]:
        """Yield device and cache changes as they happen, one dictionary per signal, each
        device event with the device's ``id``.

        Subscribes first, then reads the devices present (for the ids of later changes).

        Raises:
            ClientError: the match rules cannot be added, or the daemon is not there.
            BusError: the bus went away.
        """
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=_MONITOR_BACKLOG)
        overflowed = False

        def on_message(message: Message) -> None:
            path = message.path or ""
            ours = path == ROOT_PATH or path.startswith(ROOT_PATH + "/")
            nonlocal overflowed
            if message.message_type is MessageType.SIGNAL and ours:
                try:
                    queue.put_nowait(message)
                except asyncio.QueueFull:
                    overflowed = True

        rule = f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT_PATH}'"
        await self._bus_call_dbus("AddMatch", rule)
        self._bus.add_message_handler(on_message)
        gone = asyncio.ensure_future(self._bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        try:
            ids = await self._ids()
            while True:
                if overflowed:
                    raise ClientError(
                        "overflow", f"more than {_MONITOR_BACKLOG} changes were not read in time"
                    )
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                if not getter.done() or getter.cancelled():
                    raise BusError("the bus went away (vfiocapsd and its bus have stopped?)")
                event = describe_signal(getter.result(), ids)
                if event is not None:
                    yield event
        finally:
            gone.cancel()
            self._bus.remove_message_handler(on_message)

    async def _ids(self) -> dict[str, str]:
        """Device ids by object path, of the devices there now (none while the daemon is away:
        its devices come with InterfacesAdded when it returns)."""
        try:
            (objects,) = await self._call(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
        except ClientError as err:
            if err.name in _DAEMON_AWAY:
                return {}
            raise
        return {
            str(path): str(plain(interfaces[DEVICE_INTERFACE]).get("Id", ""))
            for path, interfaces in objects.items()
            if DEVICE_INTERFACE in interfaces
        }

    async def _bus_call_dbus(self, member: str, argument: str) -> None:
        reply = await self._bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature="s",
                body=[argument],
            )
        )
        if reply is None or reply.message_type is MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else ""
            raise ClientError("match", f"cannot subscribe: {detail}")


def describe_signal(message: Message, ids: dict[str, str]) -> dict[str, Any] | None:
    """A monitor event for a signal of ours, or None for signals we do not report; *ids* maps
    device object paths to device ids, and is kept up to date here."""
    member, body = message.member, message.body
    if message.interface == OBJECT_MANAGER_INTERFACE and member == "InterfacesAdded":
        path, interfaces = body
        values = plain(interfaces.get(DEVICE_INTERFACE, {}))
        ids[path] = str(values.get("Id", ""))
        return {"event": "device-added", "id": ids[path], "path": path, **values}
    if message.interface == OBJECT_MANAGER_INTERFACE and member == "InterfacesRemoved":
        return {"event": "device-removed", "id": ids.pop(body[0], ""), "path": body[0]}
    if message.interface == PROPERTIES_INTERFACE and member == "PropertiesChanged":
        interface, changed, _ = body
        if interface == DEVICE_INTERFACE:
            path = message.path or ""
            return {"event": "device-changed", "id": ids.get(path, ""), "path": path,
                    **plain(changed)}  # fmt: skip
        return {"event": "manager-changed", "path": message.path, **plain(changed)}
    if message.interface == MANAGER_INTERFACE and member == "CacheInvalidated":
        driver, old, new, records = body
        return {
            "event": "cache-invalidated",
            "driver": driver,
            "old_version": old,
            "new_version": new,
            "records": records,
        }
    return None


@dataclass(frozen=True)
class Column:
    """A table column: header and the key it shows."""

    header: str
    key: str


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as an aligned text table (lists joined with commas, booleans as yes/no)."""

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return ", ".join(str(item) for item in value) or "-"
        return str(value) if value not in ("", None) else "-"

    cells = [[cell(row.get(column.key)) for column in columns] for row in rows]
    widths = [
        max([len(column.header)] + [len(line[i]) for line in cells])
        for i, column in enumerate(columns)
    ]
    lines = ["  ".join(c.header.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]
    return "\n".join(lines)


def key_values(values: dict[str, Any]) -> str:
    """A dictionary as ``Key  value`` lines, keys sorted."""
    width = max((len(key) for key in values), default=0)
    return "\n".join(f"{key:<{width}}  {plain_text(values[key])}" for key in sorted(values))


def plain_text(value: Any) -> str:
    """A value as one line of text."""
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value) if value not in ("", None) else "-"


def as_json(value: Any) -> str:
    """Stable, indented JSON."""
    return json.dumps(value, indent=2, sort_keys=True)
