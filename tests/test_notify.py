"""sd_notify messages reach a real AF_UNIX datagram socket (a path or an abstract name)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfiocaps.notify import (
    MAX_MESSAGE_BYTES,
    Notifier,
    NotifyAddress,
    NotifyError,
    watchdog_interval,
)

UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ManagerSocket:
    """The service manager's end: a bound datagram socket that reads sender credentials."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self) -> tuple[str, tuple[int, int, int]]:
        data, ancillary, _, _ = self.sock.recvmsg(MAX_MESSAGE_BYTES, socket.CMSG_SPACE(UCRED.size))
        creds = (-1, -1, -1)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                creds = UCRED.unpack(payload[: UCRED.size])
        return data.decode(), creds

    def pending(self) -> list[str]:
        self.sock.setblocking(False)
        messages = []
        try:
            while True:
                messages.append(self.sock.recv(MAX_MESSAGE_BYTES).decode())
        except BlockingIOError:
            return messages
        finally:
            self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_manager(tmp_path: Path) -> Iterator[tuple[ManagerSocket, str]]:
    path = tmp_path / "notify"
    manager = ManagerSocket(str(path))
    try:
        yield manager, str(path)
    finally:
        manager.close()


@pytest.fixture
def abstract_manager() -> Iterator[tuple[ManagerSocket, str]]:
    name = f"vfiocaps-test-notify/{uuid.uuid4()}"
    manager = ManagerSocket(b"\0" + name.encode())
    try:
        yield manager, "@" + name
    finally:
        manager.close()


def notifier_for(value: str) -> Notifier:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": value})
    assert notifier is not None
    return notifier


async def test_ready_with_status_over_a_path_socket_carries_our_credentials(
    path_manager: tuple[ManagerSocket, str],
) -> None:
    manager, value = path_manager
    notifier = notifier_for(value)
    try:
        await notifier.ready("serving org.vfiocaps")
    finally:
        notifier.close()
    message, (pid, uid, gid) = manager.receive()
    assert message == "READY=1\nSTATUS=serving org.vfiocaps"
    # what NotifyAccess=main compares with the main PID
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


async def test_every_kind_of_notification_over_an_abstract_socket(
    abstract_manager: tuple[ManagerSocket, str],
) -> None:
    manager, value = abstract_manager
    notifier = notifier_for(value)
    assert notifier.address.abstract
    try:
        await notifier.status("probing 2 device types\n(1 queued)")
        await notifier.watchdog()
        await notifier.stopping("shutting down")
        await notifier.send("EXTEND_TIMEOUT_USEC=5000000")
    finally:
        notifier.close()
    received = [manager.receive()[0] for _ in range(4)]
    assert received == [
        "STATUS=probing 2 device types (1 queued)",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=shutting down",
        "EXTEND_TIMEOUT_USEC=5000000",
    ]


async def test_watchdog_pings_at_the_interval_until_cancelled(
    path_manager: tuple[ManagerSocket, str],
) -> None:
    manager, value = path_manager
    notifier = notifier_for(value)
    task = asyncio.create_task(notifier.keep_watchdog(0.05))
    await asyncio.sleep(0.33)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    notifier.close()
    pings = manager.pending()
    assert set(pings) == {"WATCHDOG=1"}
    assert 3 <= len(pings) <= 8


async def test_watchdog_loop_reports_a_vanished_manager(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    manager = ManagerSocket(str(path))
    notifier = notifier_for(str(path))
    task = asyncio.create_task(notifier.keep_watchdog(0.02))
    await asyncio.sleep(0.05)
    manager.close()
    path.unlink()
    with pytest.raises(NotifyError, match=str(path)):
        await asyncio.wait_for(task, 5)
    notifier.close()


def test_watchdog_interval_is_half_the_manager_timeout() -> None:
    assert watchdog_interval(30_000_000) == 15.0
    assert watchdog_interval(0) is None


def test_no_notify_socket_means_no_notifier() -> None:
    assert Notifier.from_environment({}) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": ""}) is None


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234", "/bad\0path"])
def test_malformed_notify_socket_is_refused(value: str) -> None:
    with pytest.raises(NotifyError):
        NotifyAddress.parse(value)


async def test_missing_socket_is_a_notify_error(tmp_path: Path) -> None:
    notifier = notifier_for(str(tmp_path / "absent"))
    with pytest.raises(NotifyError, match="absent"):
        await notifier.ready()


@pytest.mark.parametrize(
    "lines",
    [("READY=1\nWATCHDOG=1",), ("READY",), ("=1",), (), ("STATUS=" + "x" * MAX_MESSAGE_BYTES,)],
)
async def test_malformed_messages_are_refused_before_sending(
    path_manager: tuple[ManagerSocket, str], lines: tuple[str, ...]
) -> None:
    manager, value = path_manager
    notifier = notifier_for(value)
    with pytest.raises(NotifyError):
        await notifier.send(*lines)
    notifier.close()
    assert manager.pending() == []
