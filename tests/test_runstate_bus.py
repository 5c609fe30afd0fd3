"""The run-state as clients see it on a real bus: RunState, refusals while learning and while
stopping, PropertiesChanged on the way out, and vfiocapsctl status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.daemon_lab import vfiocapsctl
from support.harness import (
    BUS_NAME,
    ROOT_PATH,
    DaemonFactory,
    PrivateBus,
    busctl,
    gdbus,
    wait_until,
)

MANAGER = "org.vfiocaps1.Manager"

# A QEMU stand-in that answers -version only when the test opens its gate (a FIFO beside it):
# until then the daemon is learning the host.
GATED_QEMU = """#!/bin/sh
if [ "$1" = "-version" ]; then
    read -r line < "${0%/*}/gate"
    echo "QEMU emulator version 8.2.2"
fi
exit 0
"""


def run_state(bus: PrivateBus, destination: str = BUS_NAME) -> str:
    out = busctl(bus.address, "--json=short", "get-property", destination, ROOT_PATH, MANAGER,
                 "RunState", check=False)  # fmt: skip
    return str(json.loads(out.stdout)["data"]) if out.returncode == 0 else ""


def list_devices(bus: PrivateBus, destination: str) -> subprocess.CompletedProcess[str]:
    return gdbus(bus.address, "call", "--dest", destination, "--object-path", ROOT_PATH,
                 "--method", f"{MANAGER}.ListDevices", check=False)  # fmt: skip


@pytest.fixture
def gated_qemu() -> Iterator[Path]:
    """The gated stand-in, in a directory the probe user can traverse (QEMU runs as it)."""
    directory = Path(tempfile.mkdtemp(prefix="vfiocaps-gated-qemu-"))
    try:
        directory.chmod(0o755)
        qemu = directory / "qemu-system-x86_64"
        qemu.write_text(GATED_QEMU)
        qemu.chmod(0o755)
        os.mkfifo(directory / "gate")
        (directory / "gate").chmod(0o666)
        yield qemu
    finally:
        shutil.rmtree(directory)


def test_serving_daemon_shows_run_state_and_ctl_status_has_it(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    start_daemon()
    assert run_state(private_bus) == "serving"
    introspection = gdbus(private_bus.address, "introspect", "--dest", BUS_NAME,
                          "--object-path", ROOT_PATH).stdout  # fmt: skip
    assert "readonly s RunState = 'serving';" in introspection
    status = vfiocapsctl(private_bus, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["RunState"] == "serving"
    assert "RunState" in vfiocapsctl(private_bus, "status").stdout


def test_a_learning_daemon_owns_no_name_and_refuses_calls_until_it_serves(
    private_bus: PrivateBus, start_daemon: DaemonFactory, gated_qemu: Path
) -> None:
    daemon = start_daemon("--qemu", str(gated_qemu), wait=False)
    assert daemon.process is not None
    pid = daemon.process.pid

    def exported() -> bool:
        names = private_bus.unique_names_of(pid)
        return bool(names) and run_state(private_bus, names[0]) != ""

    wait_until(exported, 60, "the daemon's root object on its unique name")
    (unique,) = private_bus.unique_names_of(pid)
    assert run_state(private_bus, unique) == "learning"
    assert not private_bus.name_has_owner()
    refused = list_devices(private_bus, unique)
    assert refused.returncode != 0
    assert "org.vfiocaps1.Error.NotReady" in refused.stderr, refused.stderr
    assert "vfiocapsd is learning: it answers ListDevices once it has learned" in refused.stderr
    ctl = vfiocapsctl(private_bus, "status")
    assert ctl.returncode == 3  # no name yet: "not reachable", as for a daemon not started

    with (gated_qemu.parent / "gate").open("w") as gate:  # QEMU answers: the host is learned
        gate.write("go\n")
    daemon.wait_serving(60)
    assert run_state(private_bus) == "serving"
    answered = list_devices(private_bus, BUS_NAME)
    assert answered.returncode == 0, answered.stderr
    assert daemon.stop() == 0


def test_stop_is_signalled_and_a_stopping_daemon_refuses_calls(
    private_bus: PrivateBus, start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """The service manager stops reading while the daemon stops: its STOPPING=1 waits, and the
    daemon stays in 'stopping' for up to the notification timeout. Its outputs are taken back
    before the name goes (a successor must not serve first), so callers reach it then through
    the well-known name as well as through its unique name: both are refused."""
    address = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(30)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    daemon = start_daemon(env={"NOTIFY_SOCKET": str(address)})
    assert daemon.process is not None
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--address", private_bus.address, "--dest", BUS_NAME],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert receiver.recv(4096).startswith(b"READY=1")
        wait_until(lambda: private_bus.match_rules_of(monitor.pid), 30, "gdbus monitor's rules")
        for _ in range(10_000):  # the manager's queue, full: the next notification waits
            try:
                filler.sendto(b"X=1", str(address))
            except BlockingIOError:
                break
        (unique,) = private_bus.unique_names_of(daemon.process.pid)
        daemon.process.send_signal(signal.SIGTERM)

        wait_until(lambda: run_state(private_bus) == "stopping", 4, "RunState 'stopping'")
        assert private_bus.name_has_owner()
        for destination in (BUS_NAME, unique):
            refused = list_devices(private_bus, destination)
            assert "org.vfiocaps1.Error.ShuttingDown" in refused.stderr, refused.stderr
            assert "vfiocapsd is stopping: ListDevices is not answered any more" in refused.stderr

        messages: list[bytes] = []  # reading again lets STOPPING=1 through
        while not any(m.startswith(b"STOPPING=1") for m in messages):
            messages.append(receiver.recv(4096))
        assert daemon.stop() == 0
        time.sleep(0.2)  # the monitor prints what it received before the name went
    finally:
        monitor.terminate()
        output, _ = monitor.communicate(timeout=10)
        receiver.close()
        filler.close()
    assert "'RunState': <'stopping'>" in output, output
    assert "InterfacesRemoved" not in output, output
