"""The daemon as a process: owns its name, exports its root object, starts and stops cleanly."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from support.harness import (
    BUS_NAME,
    ROOT_PATH,
    DaemonFactory,
    PrivateBus,
    busctl,
    gdbus,
    wait_until,
)


def test_introspection_shows_object_manager_and_manager(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    start_daemon()
    out = busctl(private_bus.address, "introspect", BUS_NAME, ROOT_PATH).stdout
    assert "org.freedesktop.DBus.ObjectManager" in out
    assert "org.vfiocaps1.Manager" in out
    assert ".Version" in out


def test_version_property_through_gdbus(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    start_daemon()
    out = gdbus(
        private_bus.address,
        "call",
        "--dest",
        BUS_NAME,
        "--object-path",
        ROOT_PATH,
        "--method",
        "org.freedesktop.DBus.Properties.Get",
        "org.vfiocaps1.Manager",
        "Version",
    ).stdout
    from vfiocaps import __version__

    assert f"<'{__version__}'>" in out


def test_second_daemon_exits_nonzero_with_clear_message(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    first = start_daemon()
    second = start_daemon(wait=False, name="second")
    assert second.process is not None
    status = second.process.wait(20)
    assert status != 0
    assert "org.vfiocaps is already owned by another process" in second.log()
    assert "Traceback" not in second.log()
    assert first.alive()
    assert private_bus.name_has_owner()


def test_sigterm_and_sigint_exit_cleanly(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    for number, sig in enumerate((signal.SIGTERM, signal.SIGINT)):
        daemon = start_daemon(name=f"d{number}")
        assert daemon.stop(sig) == 0, daemon.log()
        assert "Traceback" not in daemon.log()
        wait_until(lambda: not private_bus.name_has_owner(), 5, "the name to be released")


def test_bus_going_away_is_a_failure(private_bus: PrivateBus, start_daemon: DaemonFactory) -> None:
    daemon = start_daemon()
    private_bus.stop()
    assert daemon.process is not None
    status = daemon.process.wait(20)
    assert status != 0
    assert "lost the connection" in daemon.log()


def test_unreachable_bus_is_a_clear_failure(
    private_bus: PrivateBus, start_daemon: DaemonFactory, tmp_path: object
) -> None:
    daemon = start_daemon("--bus-address", "unix:path=/nonexistent/bus", wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(20) != 0
    assert "cannot connect to the bus at unix:path=/nonexistent/bus" in daemon.log()


def test_service_manager_notifications(
    private_bus: PrivateBus, start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """READY once serving, STATUS lines, WATCHDOG pings at half the timeout, STOPPING at the end."""
    address = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(10)
    try:
        daemon = start_daemon(env={"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "400000"})
        messages: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            messages.append(receiver.recv(4096).decode())
            if sum("WATCHDOG=1" in m for m in messages) >= 4 and any(
                m.startswith("STATUS=") for m in messages
            ):
                break
        assert messages[0].startswith("READY=1\nSTATUS=serving org.vfiocaps")
        assert sum("WATCHDOG=1" in m for m in messages) >= 4
        assert any(m.startswith("STATUS=0 devices") for m in messages), messages
        assert daemon.stop() == 0
        while not (message := receiver.recv(4096).decode()).startswith("STOPPING=1"):
            pass
        assert message.startswith("STOPPING=1")
    finally:
        receiver.close()
