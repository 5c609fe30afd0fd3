"""Connecting to the message bus with a writer that waits on a full socket instead of dying.

dbus-fast's asyncio writer treats ``EAGAIN`` from ``send()`` as fatal and drops the connection,
so any local client that floods the service with calls and never reads the replies can knock the
service off the bus (python-dbus-next issue #153, inherited by dbus-fast).
:class:`ResilientMessageBus` replaces that writer with one that keeps the unsent remainder and
resumes when the socket becomes writable.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
from collections.abc import Iterable
from typing import Any, Protocol

from dbus_fast import BusType, Message, MessageFlag, Variant
from dbus_fast import introspection as intr
from dbus_fast._private.marshaller import Marshaller
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.service import ServiceInterface

from ..config import BusChoice, BusKind
from ..errors import BusError
from ..runstate import Lifecycle
from .names import OBJECT_MANAGER_INTERFACE

log = logging.getLogger(__name__)


# The private parts of dbus-fast that this module (and no other) relies on, as
# ``module:attribute path``; tests/test_private_members.py checks each against the installed
# library, so an upgrade that drops one fails the tests, not the daemon.
DBUS_FAST_PRIVATE = (
    "dbus_fast.aio.message_bus:_MessageWriter",
    "dbus_fast.aio.message_bus:MessageBus._finalize",
    "dbus_fast.aio.message_bus:MessageBus._emit_interface_added",
    "dbus_fast.aio.message_bus:MessageBus._emit_interface_removed",
    "dbus_fast.aio.message_bus:MessageBus._default_get_managed_objects_handler",
    "dbus_fast.aio.message_bus:MessageBus._introspect_export_path",
    "dbus_fast.service:ServiceInterface._get_all_property_values",
)
# Instance attributes read or replaced: of a connection, and of its message writer.
DBUS_FAST_BUS_ATTRIBUTES = ("_writer", "_user_disconnect", "_disconnected", "_path_exports")
DBUS_FAST_WRITER_ATTRIBUTES = (
    "bus", "loop", "sock", "fd", "buf", "offset", "messages", "unix_fds", "fut",
    "negotiate_unix_fd",
)  # fmt: skip

MANAGED_OBJECTS = "a{oa{sa{sv}}}"
MANAGED_OBJECT_ENTRY = "oa{sa{sv}}"  # one entry of MANAGED_OBJECTS, marshalled alone
# From the D-Bus specification: a message header is four bytes, the body length (uint32), the
# serial (uint32) and the header fields (an array: uint32 byte length, then the fields), padded
# to 8; an array holds at most 64 MiB.
HEADER_BODY_LENGTH_OFFSET = 4
HEADER_FIELDS_OFFSET = 12
MAX_ARRAY_BYTES = 1 << 26


ManagedInterfaces = dict[str, dict[str, Variant]]  # interface name -> property -> value


class ObjectSource(Protocol):
    """Objects served by a message handler rather than exported one by one: the bus lists them
    in introspection and in ``GetManagedObjects``."""

    def child_names(self, path: str) -> Iterable[str]:
        """Names of the nodes just below *path* that lead to one of the objects."""

    def managed_objects(self, path: str) -> Iterable[tuple[str, ManagedInterfaces]]:
        """The objects below *path*, each with its interfaces and their properties."""


def _resolve(fut: asyncio.Future[None] | None, err: Exception | None = None) -> None:
    if fut is None or fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


class _BackpressureWriter(_MessageWriter):
    """A message writer for which a full socket means "wait until writable", not "disconnect"."""

    def write_callback(self, remove_writer: bool = True) -> None:
        """Write queued messages until the queue is empty or the socket would block.

        On ``EAGAIN``/``EINTR`` the partly written message stays in ``buf`` at ``offset`` (its file
        descriptors, if any, unsent) and the event loop's writer resumes it. Any other socket error
        ends the connection as the library does.
        """
        sock, fd = self.sock, self.fd
        if sock is None or fd is None:
            return
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(fd)
                        return
                    data, unix_fds, fut = self.messages.popleft()
                    self.buf, self.offset = memoryview(data), 0
                    self.unix_fds, self.fut = unix_fds, fut
                pending = self.buf[self.offset :]
                if self.unix_fds and self.negotiate_unix_fd:
                    fds = array.array("i", self.unix_fds)
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                    self.offset += sock.sendmsg([pending], ancillary)
                    self.unix_fds = None
                else:
                    self.offset += sock.send(pending)
                if self.offset < len(self.buf):
                    self._wait_writable()
                    return
                self.buf = None
                _resolve(self.fut)
        except (BlockingIOError, InterruptedError):
            self._wait_writable()
        except OSError as err:
            _resolve(self.fut, None if self.bus._user_disconnect else err)
            self.bus._finalize(err)

    def _wait_writable(self) -> None:
        if self.fd is not None:
            self.loop.add_writer(self.fd, self.write_callback)


class ResilientMessageBus(MessageBus):
    """An asyncio :class:`MessageBus` whose writer survives a peer that stops reading.

    It also emits ObjectManager signals from the manager's object: with ``object_manager_root``
    set, ``InterfacesAdded``/``InterfacesRemoved`` for objects below it come from that path, as
    the D-Bus specification says (the library sends them from the object's own path).
    """

    object_manager_root: str | None = None
    # The daemon's run-state, once it serves objects on this connection: objects exported or
    # unexported while it is not serving (the name is not owned yet, or is being given back)
    # are not announced. Clients call GetManagedObjects when the name appears and drop
    # everything when it goes.
    lifecycle: Lifecycle | None = None
    # Objects that are not exported but served by a message handler (see ObjectSource).
    object_source: ObjectSource | None = None

    @property
    def announcing(self) -> bool:
        """Whether objects that come and go are announced: only while the daemon serves."""
        return self.lifecycle is None or self.lifecycle.serving

    def _manager_for(self, path: str) -> str | None:
        root = self.object_manager_root
        if root is not None and path.startswith(root + "/"):
            return root
        return None

    def announce_added(self, path: str, interfaces: ManagedInterfaces) -> None:
        """Send ``InterfacesAdded`` for an object at *path*, from its manager's path."""
        self._announce(path, "InterfacesAdded", "oa{sa{sv}}", interfaces)

    def announce_removed(self, path: str, interfaces: list[str]) -> None:
        """Send ``InterfacesRemoved`` for an object at *path*, from its manager's path."""
        self._announce(path, "InterfacesRemoved", "oas", interfaces)

    def _announce(self, path: str, member: str, signature: str, interfaces: object) -> None:
        if self._disconnected or not self.announcing:
            return
        self.send(
            Message.new_signal(
                path=self._manager_for(path) or path,
                interface=OBJECT_MANAGER_INTERFACE,
                member=member,
                signature=signature,
                body=[path, interfaces],
            )
        )

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected or not self.announcing:
            return

        def send(_: ServiceInterface, values: Any, __: Any, err: Exception | None) -> None:
            if err is not None:
                log.error("properties of %s at %s unreadable: %s", interface.name, path, err)
                return
            self.announce_added(path, {interface.name: values})

        ServiceInterface._get_all_property_values(interface, send)

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        self.announce_removed(path, removed_interfaces)

    def _introspect_export_path(self, path: str) -> intr.Node:
        """The library's node for *path*, with the object source's children beside the
        exported ones."""
        node = super()._introspect_export_path(path)
        source = self.object_source
        if source is not None:
            known = {child.name for child in node.nodes}
            node.nodes += [
                intr.Node(name) for name in source.child_names(path) if name not in known
            ]
        return node

    def _default_get_managed_objects_handler(self, msg: Message, send_reply: Any) -> None:
        """``GetManagedObjects`` marshalled one object at a time, straight into the reply's body.

        The library would first build the whole answer as Python values (a dictionary and a
        ``Variant`` per property: for 10,000 devices several times the reply's size) and then
        marshal it twice (body, then header + body). Here each object's entry is marshalled
        as soon as its properties are in and its values dropped, and the header and the body
        go to the socket as two buffers, so the only large allocation is the body itself.
        The object source's objects come first, then the exported ones (their getters may answer
        later). The first property getter error is sent instead, once.
        """
        if msg.flags.value & MessageFlag.NO_REPLY_EXPECTED.value:
            return
        prefix = "/" if msg.path == "/" else f"{msg.path}/"
        exports = [
            (node, interfaces)
            for node, interfaces in self._path_exports.items()
            if node.startswith(prefix)
        ]
        body = bytearray(8)  # the array's byte length (set at the end) and padding to 8
        partial: dict[str, dict[str, Any]] = {}
        missing: dict[str, int] = {}
        nodes_left = len(exports)
        failed = False

        def add_entry(node: str, interfaces: dict[str, Any]) -> None:
            nonlocal nodes_left
            body.extend(bytes(-len(body) % 8))  # every dict entry starts 8-aligned
            body.extend(Marshaller(MANAGED_OBJECT_ENTRY, [node, interfaces]).marshall())
            nodes_left -= 1
            if nodes_left == 0:
                self._send_managed_objects(msg, body, send_reply)

        def collected(
            interface: ServiceInterface, values: Any, node: str, err: Exception | None
        ) -> None:
            nonlocal failed
            if failed:
                return
            if err is not None:
                failed = True
                send_reply.send_error(err)
                return
            partial[node][interface.name] = values
            missing[node] -= 1
            if missing[node] == 0:
                del missing[node]
                add_entry(node, partial.pop(node))

        source = self.object_source
        if source is not None:
            for object_path, managed in source.managed_objects(msg.path or "/"):
                body.extend(bytes(-len(body) % 8))
                body.extend(Marshaller(MANAGED_OBJECT_ENTRY, [object_path, managed]).marshall())
        if not exports:
            self._send_managed_objects(msg, body, send_reply)
            return
        for node, interfaces in exports:
            if not interfaces:
                add_entry(node, {})
                continue
            partial[node] = {}
            missing[node] = len(interfaces)
            for interface in list(interfaces.values()):
                ServiceInterface._get_all_property_values(interface, collected, node)

    def _send_managed_objects(self, msg: Message, body: bytearray, send_reply: Any) -> None:
        """Send *body* (a marshalled ``a{oa{sa{sv}}}`` whose length is still unset) as the reply
        to *msg*: the header is the library's for an empty answer, with the real body length."""
        array_bytes = len(body) - 8
        if array_bytes > MAX_ARRAY_BYTES:
            send_reply(
                Message.new_error(
                    msg,
                    "org.freedesktop.DBus.Error.LimitsExceeded",
                    f"the answer would be {array_bytes} bytes, more than a D-Bus array may hold",
                )
            )
            return
        struct.pack_into("<I", body, 0, array_bytes)
        reply = Message.new_method_return(msg, MANAGED_OBJECTS, [{}])
        reply.serial = self.next_serial()
        empty = reply._marshall(self._negotiate_unix_fd)
        fields_bytes = struct.unpack_from("<I", empty, HEADER_FIELDS_OFFSET)[0]
        header_bytes = HEADER_FIELDS_OFFSET + 4 + fields_bytes
        header = empty[: header_bytes + (-header_bytes % 8)]
        struct.pack_into("<I", header, HEADER_BODY_LENGTH_OFFSET, len(body))
        writer = self._writer
        if writer is None or self._disconnected:
            return
        # Both parts are queued together: nothing else can come between them on the stream.
        writer.messages.append((header, None, None))
        writer.messages.append((body, None, None))
        writer.schedule_write()

    async def connect(self) -> ResilientMessageBus:
        """Connect and authenticate, then install the back-pressure writer.

        Raises:
            OSError, dbus_fast.AuthError: as :meth:`MessageBus.connect`.
        """
        await super().connect()
        old = self._writer
        if old is None:  # connect() always creates one; be explicit rather than assert
            raise OSError("the bus connection has no writer after connect()")
        writer = _BackpressureWriter(self)
        writer.messages = old.messages
        writer.buf, writer.offset = old.buf, old.offset
        writer.unix_fds, writer.fut = old.unix_fds, old.fut
        self._writer = writer
        if writer.buf is not None or writer.messages:
            writer._wait_writable()
        return self


_ADDRESS_ADVICE = (
    "name the bus with --bus-address=unix:path=SOCKET, or set DBUS_SESSION_BUS_ADDRESS or "
    "DBUS_SYSTEM_BUS_ADDRESS to a D-Bus address"
)


def _why(err: Exception) -> str:
    """Why a connection failed, saying what to do (the library's text is often empty)."""
    if isinstance(err, FileNotFoundError | ConnectionRefusedError):
        return f"{err}: no bus listens there (is the daemon's bus running?)"
    if isinstance(err, PermissionError):
        return (
            f"{err}: this user (uid {os.getuid()}) may not open the bus socket; run "
            "vfiocapsctl as the user who started the bus, e.g. with sudo"
        )
    detail = str(err) or type(err).__name__
    return (
        f"{detail}: the bus refused this user (uid {os.getuid()}); a private bus (the quick "
        "start's, the demo's) admits only the user who started it: run vfiocapsctl as that "
        "user, e.g. with sudo"
    )


async def connect_bus(choice: BusChoice) -> ResilientMessageBus:
    """Connect to the bus *choice* names.

    Raises:
        BusError: the address is malformed or missing, or the bus cannot be reached or refuses
            authentication.
    """
    try:
        # The library reads and parses the address (DBUS_*_BUS_ADDRESS) in the constructor.
        if choice.kind is BusKind.ADDRESS:
            bus = ResilientMessageBus(bus_address=choice.address)
        elif choice.kind is BusKind.SESSION:
            bus = ResilientMessageBus(bus_type=BusType.SESSION)
        else:
            bus = ResilientMessageBus(bus_type=BusType.SYSTEM)
    except Exception as err:
        raise BusError(f"cannot use the {choice.describe()}: {err}; {_ADDRESS_ADVICE}") from err
    try:
        await bus.connect()
    except asyncio.CancelledError:
        raise
    except Exception as err:
        raise BusError(f"cannot connect to the {choice.describe()}: {_why(err)}") from err
    log.info("connected to the %s as %s", choice.describe(), bus.unique_name)
    return bus


async def wait_disconnected(bus: MessageBus) -> None:
    """Wait until *bus* is disconnected, for whatever reason.

    Raises:
        Exception: the error that ended the connection, if it ended with one.
    """
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


async def close_bus(bus: MessageBus) -> None:
    """Disconnect *bus* and wait until the library has finished with it.

    Raises:
        asyncio.CancelledError: only when the calling task itself is being cancelled.
    """
    if not bus.connected:
        return
    bus.disconnect()
    try:
        await wait_disconnected(bus)
    except asyncio.CancelledError:
        # the library cancels its disconnect future on a user disconnect; re-raise only our own
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception as err:  # noqa: BLE001 - a failing socket at close is only worth a line
        log.debug("bus closed with an error: %s", err)
