"""A peer that stops reading must not knock the daemon off the bus (dbus-next #153 / dbus-fast)."""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
from dbus_fast import Message
from dbus_fast.aio.message_bus import _MessageWriter

from support.harness import (
    BUS_NAME,
    ROOT_PATH,
    DaemonFactory,
    PrivateBus,
    busctl,
    raw_bus_connection,
)
from vfiocaps.bus.connection import _BackpressureWriter


def _fake_bus(sock: socket.socket, loop: asyncio.AbstractEventLoop) -> Any:
    finalized: list[Exception | None] = []
    bus = SimpleNamespace(
        _negotiate_unix_fd=False,
        _sock=sock,
        _loop=loop,
        _fd=sock.fileno(),
        _user_disconnect=False,
        unique_name=":1.1",
        finalized=finalized,
    )
    bus._finalize = finalized.append
    return bus


def _signals(count: int) -> list[Message]:
    return [
        Message.new_signal("/t", "org.example.T", "S", "s", [f"{i:08d}" + "x" * 4000])
        for i in range(count)
    ]


async def _flood(writer_class: type[_MessageWriter]) -> tuple[list[Exception | None], int, int]:
    """Queue far more than the socket buffer holds, then drain the peer; return what arrived."""
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    bus = _fake_bus(ours, loop)
    writer = writer_class(bus)
    messages = _signals(500)
    expected = sum(len(m._marshall(False)) for m in messages)
    try:
        for message in messages:
            writer.schedule_write(message)
        received = 0
        peer.setblocking(False)
        deadline = time.monotonic() + 10
        while received < expected and not bus.finalized and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
            try:
                while chunk := peer.recv(65536):
                    received += len(chunk)
            except BlockingIOError:
                pass
        return bus.finalized, received, expected
    finally:
        loop.remove_writer(ours.fileno())
        ours.close()
        peer.close()


async def test_library_writer_drops_the_connection_on_eagain() -> None:
    finalized, _, _ = await _flood(_MessageWriter)
    if not finalized:
        pytest.skip("this dbus-fast no longer treats EAGAIN as fatal")
    assert isinstance(finalized[0], BlockingIOError)


async def test_backpressure_writer_waits_and_delivers_every_byte() -> None:
    finalized, received, expected = await _flood(_BackpressureWriter)
    assert finalized == []
    assert received == expected


def test_flooding_client_cannot_knock_the_daemon_off_the_bus(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    """20,000 pipelined calls whose replies are never read; the daemon keeps its name and serves."""
    daemon = start_daemon()
    flooder = raw_bus_connection(private_bus.address)
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        batch = bytearray()
        for serial in range(2, 20_002):
            call = Message(
                destination=BUS_NAME,
                path=ROOT_PATH,
                interface="org.freedesktop.DBus.Introspectable",
                member="Introspect",
                serial=serial,
            )
            batch += call._marshall(False)
        flooder.sendall(batch)
        time.sleep(3)
        assert daemon.alive(), daemon.log()
        assert private_bus.name_has_owner()
        out = busctl(
            private_bus.address,
            "get-property",
            BUS_NAME,
            ROOT_PATH,
            "org.vfiocaps1.Manager",
            "Version",
            timeout=30,
        )
        assert out.stdout.startswith('s "')
    finally:
        flooder.close()
    time.sleep(0.5)
    assert daemon.alive(), daemon.log()
    assert private_bus.name_has_owner()
    assert "BlockingIOError" not in daemon.log()
