"""dbus-fast and pyudev private members the daemon uses: each still there, each in one module.

An upgrade of either library that renames one fails here, with its name, instead of in a
running daemon.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from dbus_fast.aio.message_bus import MessageBus, _MessageWriter

from vfiocaps.bus import connection
from vfiocaps.discovery import monitor

DAEMON = Path(connection.__file__).resolve().parent.parent
OWNERS = {
    Path(connection.__file__).resolve(): connection.DBUS_FAST_PRIVATE,
    Path(monitor.__file__).resolve(): monitor.PYUDEV_PRIVATE,
}


def _resolve(spec: str) -> object:
    module_name, _, path = spec.partition(":")
    value: object = importlib.import_module(module_name)
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("spec", [*connection.DBUS_FAST_PRIVATE, *monitor.PYUDEV_PRIVATE])
def test_a_private_member_still_exists(spec: str) -> None:
    assert callable(_resolve(spec)), spec


async def test_the_connection_and_writer_attributes_still_exist() -> None:
    bus = MessageBus(bus_address="unix:path=/nonexistent")
    missing = [name for name in connection.DBUS_FAST_BUS_ATTRIBUTES if not hasattr(bus, name)]
    ours, peer = socket.socketpair()
    with ours, peer:
        fake = SimpleNamespace(
            _negotiate_unix_fd=False,
            _sock=ours,
            _loop=asyncio.get_running_loop(),
            _fd=ours.fileno(),
            _user_disconnect=False,
            unique_name=":1.1",
        )
        writer = _MessageWriter(fake)
        missing += [n for n in connection.DBUS_FAST_WRITER_ATTRIBUTES if not hasattr(writer, n)]
    assert missing == []


def test_a_spec_that_is_gone_is_reported() -> None:
    with pytest.raises(AttributeError):
        _resolve("dbus_fast.aio.message_bus:MessageBus._no_such_member")


def test_no_other_module_uses_them() -> None:
    names = {
        spec.rpartition(".")[2].rpartition(":")[2] for specs in OWNERS.values() for spec in specs
    }
    names |= {*connection.DBUS_FAST_BUS_ATTRIBUTES}
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    users = {
        str(path.relative_to(DAEMON))
        for path in DAEMON.rglob("*.py")
        if path.resolve() not in OWNERS and pattern.search(path.read_text())
    }
    assert users == set()
