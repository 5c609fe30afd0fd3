"""A daemon on a umockdev host with the fake QEMU: the set-up of the engine and device tests."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import BUS_NAME, ROOT_PATH, DaemonProcess, PrivateBus, busctl, wait_until
from .prober import ensure_probe_user, install_fake_qemu, make_group_node
from .umockdev_hosts import MockHost

MANAGER = "org.vfiocaps1.Manager"


def manager_property(bus: PrivateBus, name: str) -> Any:
    out = busctl(bus.address, "get-property", "--json=short", BUS_NAME, ROOT_PATH, MANAGER, name)
    return json.loads(out.stdout)["data"]


def capabilities(bus: PrivateBus, device_id: str) -> dict[str, Any]:
    out = busctl(
        bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH, MANAGER, "GetCapabilities",
        "s", device_id, timeout=120,
    )  # fmt: skip
    return {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}


def manager_call(
    bus: PrivateBus, method: str, *args: str, timeout: float = 120, check: bool = True
) -> Any:
    """A Manager method's answer (busctl's JSON ``data``); its error text when *check* is false
    and the call failed."""
    out = busctl(
        bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH, MANAGER, method, *args,
        timeout=timeout, check=check,
    )  # fmt: skip
    return json.loads(out.stdout)["data"] if out.returncode == 0 else out.stderr


def device_object_path(bus: PrivateBus, device_id: str) -> str:
    """The object path the daemon gives the device *device_id* (``GetDevice``)."""
    path: str = manager_call(bus, "GetDevice", "s", device_id, timeout=30)[0]
    return path


def list_types(bus: PrivateBus) -> dict[tuple[str, str], dict[str, Any]]:
    """``ListTypes`` by (parent, type id), each entry's values unwrapped."""
    return {
        (entry["Parent"]["data"], entry["TypeId"]["data"]): {
            key: value["data"] for key, value in entry.items()
        }
        for entry in manager_call(bus, "ListTypes", timeout=30)[0]
    }


def vfiocapsctl(
    bus: PrivateBus, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``vfiocapsctl`` against the daemon on *bus*, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "vfiocaps.ctl", "--bus-address", bus.address, *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        check=False,
    )


@dataclass
class Lab:
    """A scratch tree the probe user can read: bus, umockdev host, fake QEMU, /dev/vfio."""

    directory: Path
    bus: PrivateBus
    host: MockHost
    qemu: Path
    dev: Path
    daemons: list[DaemonProcess] = field(default_factory=list)

    def daemon_args(self, *args: str) -> list[str]:
        """A daemon's arguments on this lab: its host, QEMU stand-in, group nodes and cache."""
        return [
            *self.host.daemon_args(),
            "--qemu",
            str(self.qemu),
            "--dev-root",
            str(self.dev),
            "--cache-dir",
            str(self.directory / "cache"),
            *args,
        ]

    def daemon(
        self, *args: str, name: str = "daemon", bus: PrivateBus | None = None
    ) -> DaemonProcess:
        """A daemon on this lab's host under umockdev, not started yet (see :meth:`start`)."""
        return DaemonProcess(
            bus=bus or self.bus,
            workdir=self.directory / name,
            args=[*self.daemon_args(*args), *self.host.probe_env_args()],
            env=self.host.daemon_env(),
            wrapper=self.host.daemon_wrapper(),
        )

    def start(self, *args: str, name: str = "daemon") -> DaemonProcess:
        daemon = self.daemon(*args, name=name)
        self.daemons.append(daemon)
        daemon.start()
        wait_until(lambda: "event Resynchronised" in daemon.log(), 90, "the coldplug")
        return daemon

    def overrides(self, value: dict[str, Any]) -> None:
        (self.qemu.parent / "overrides.json").write_text(json.dumps(value))
        (self.qemu.parent / "overrides.json").chmod(0o644)

    def devices(self) -> dict[str, dict[str, Any]]:
        """Device id -> Device properties, from ObjectManager.GetManagedObjects."""
        out = busctl(
            self.bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH,
            "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
        )  # fmt: skip
        objects = json.loads(out.stdout)["data"][0]
        return {
            props["Id"]["data"]: {key: value["data"] for key, value in props.items()}
            for interfaces in objects.values()
            if (props := interfaces.get("org.vfiocaps1.Device"))
        }

    def states(self) -> dict[str, str]:
        """Device id -> ProbeState."""
        return {device_id: props["ProbeState"] for device_id, props in self.devices().items()}

    def wait_states(self, wanted: dict[str, str], timeout: float = 180) -> None:
        """Wait until the devices are in the *wanted* states. The bound is generous: on a loaded
        host a probe can take a minute; it only turns a hang into a failure."""
        wait_until(
            lambda: all(self.states().get(i) == s for i, s in wanted.items()),
            timeout,
            f"device states {wanted}",
            interval=0.2,
        )


def make_lab(host_class: type[MockHost] = MockHost) -> Iterator[Lab]:
    """Build a lab (its host a *host_class*), yield it, and take it all down again: every step
    of the take-down runs, also when building failed half-way or an earlier step failed (a
    daemon that ignores SIGTERM still leaves no bus, test bed or directory behind)."""
    ensure_probe_user()
    directory = Path(tempfile.mkdtemp(prefix="vfiocaps-engine-"))
    with contextlib.ExitStack() as teardown:
        teardown.callback(shutil.rmtree, directory, ignore_errors=True)
        directory.chmod(0o755)
        dev = directory / "dev"
        (dev / "vfio").mkdir(parents=True)
        for group in range(64):
            make_group_node(dev / "vfio" / str(group))
        bus = PrivateBus(directory / "bus")
        teardown.callback(bus.stop)
        bus.start()
        host = host_class()
        teardown.callback(host.stop)
        host.start()
        host.root.chmod(0o755)
        lab = Lab(directory, bus, host, install_fake_qemu(directory / "qemu"), dev)
        teardown.callback(_stop_daemons, lab)
        yield lab


def _stop_daemons(lab: Lab) -> None:
    """Stop every daemon of *lab* that still runs; one that will not stop is killed (by
    DaemonProcess.stop), and the first such failure is raised after all were stopped."""
    failures: list[AssertionError] = []
    for daemon in lab.daemons:
        if daemon.alive():
            try:
                daemon.stop()
            except AssertionError as err:
                failures.append(err)
    if failures:
        raise failures[0]
