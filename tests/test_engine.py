"""The engine through the real daemon: one probe per key, warm restarts, invalidation, backoff.

The host is umockdev (the kernel's sample drivers and vendor parents), the probes run the real
prober against the fake QEMU that speaks real QMP (no mdev can exist here), over a real bus.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import BUS_NAME, ROOT_PATH, DaemonProcess, PrivateBus, busctl, wait_until
from test_prober_helpers import ensure_probe_user, install_fake_qemu
from umockdev_hosts import MockHost

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

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


@dataclass
class Lab:
    """A scratch tree the probe user can read: bus, umockdev host, fake QEMU, /dev/vfio."""

    directory: Path
    bus: PrivateBus
    host: MockHost
    qemu: Path
    dev: Path
    daemons: list[DaemonProcess] = field(default_factory=list)

    def start(self, *args: str, name: str = "daemon") -> DaemonProcess:
        daemon = DaemonProcess(
            bus=self.bus,
            workdir=self.directory / name,
            args=[
                *self.host.daemon_args(),
                "--qemu",
                str(self.qemu),
                "--dev-root",
                str(self.dev),
                "--cache-dir",
                str(self.directory / "cache"),
                *args,
            ],
            env=self.host.daemon_env(),
            wrapper=self.host.daemon_wrapper(),
        )
        self.daemons.append(daemon)
        daemon.start()
        wait_until(lambda: "event Resynchronised" in daemon.log(), 20, "the coldplug")
        return daemon

    def overrides(self, value: dict[str, Any]) -> None:
        (self.qemu.parent / "overrides.json").write_text(json.dumps(value))
        (self.qemu.parent / "overrides.json").chmod(0o644)

    def states(self) -> dict[str, str]:
        out = busctl(
            self.bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH,
            "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
        )  # fmt: skip
        objects = json.loads(out.stdout)["data"][0]
        return {
            props["Id"]["data"]: props["ProbeState"]["data"]
            for interfaces in objects.values()
            if (props := interfaces.get("org.vfiocaps1.Device"))
        }

    def wait_states(self, wanted: dict[str, str], timeout: float = 60) -> None:
        wait_until(
            lambda: all(self.states().get(i) == s for i, s in wanted.items()),
            timeout,
            f"device states {wanted}",
            interval=0.2,
        )


@pytest.fixture
def lab() -> Iterator[Lab]:
    ensure_probe_user()
    directory = Path(tempfile.mkdtemp(prefix="vfiocaps-engine-"))
    directory.chmod(0o755)
    dev = directory / "dev"
    (dev / "vfio").mkdir(parents=True)
    for group in range(64):
        node = dev / "vfio" / str(group)
        node.write_text("")
        node.chmod(0o600)
    bus = PrivateBus(directory / "bus").start()
    host = MockHost().start()
    host.root.chmod(0o755)
    lab = Lab(directory, bus, host, install_fake_qemu(directory / "qemu"), dev)
    try:
        yield lab
    finally:
        for daemon in lab.daemons:
            if daemon.alive():
                daemon.stop()
        host.stop()
        bus.stop()
        shutil.rmtree(directory, ignore_errors=True)


def history_rows(lab: Lab) -> list[tuple[str, str, str]]:
    with sqlite3.connect(lab.directory / "cache" / "capabilities.sqlite") as db:
        return db.execute(
            "SELECT driver, type_id, outcome FROM probe_history ORDER BY id"
        ).fetchall()


def test_twenty_devices_of_two_types_cause_exactly_two_probes(lab: Lab) -> None:
    lab.host.build("mtty")
    daemon = lab.start()
    uuids = [lab.host.add_instance("mtty", "mtty-1") for _ in range(10)]
    uuids += [lab.host.add_instance("mtty", "mtty-2") for _ in range(10)]
    lab.wait_states(dict.fromkeys(uuids, "done"))
    assert manager_property(lab.bus, "ProbeCount") == 2
    assert manager_property(lab.bus, "DeviceCount") == 20
    caps = capabilities(lab.bus, uuids[-1])
    assert caps["Display"] == "none"
    assert caps["Migration"] == "supported"
    assert daemon.log().count("probed ") == 2
    time.sleep(0.5)
    assert sorted(history_rows(lab)) == [("mtty", "mtty-1", "ok"), ("mtty", "mtty-2", "ok")]


def test_restart_with_a_warm_cache_launches_no_qemu(lab: Lab) -> None:
    lab.host.build("samples")
    first = lab.start()
    uuids = {
        lab.host.add_instance("mtty", "mtty-1"): ("none", "supported", False),
        lab.host.add_instance("mdpy", "mdpy-hd"): ("region", "unsupported", False),
        lab.host.add_instance("mbochs", "mbochs-small"): ("dmabuf", "unsupported", True),
    }
    lab.wait_states(dict.fromkeys(uuids, "done"))
    assert manager_property(lab.bus, "ProbeCount") == 3
    assert first.stop() == 0
    second = lab.start(name="second")
    lab.wait_states(dict.fromkeys(uuids, "done"), timeout=20)
    assert manager_property(lab.bus, "ProbeCount") == 0
    for uuid, (display, migration, gl) in uuids.items():
        caps = capabilities(lab.bus, uuid)
        assert (caps["Display"], caps["Migration"], caps["GlRequired"]) == (display, migration, gl)
    assert "probed " not in second.log()


def test_driver_update_reprobes_exactly_the_affected_types(lab: Lab) -> None:
    lab.host.build("samples")
    daemon = lab.start()
    mdpy = lab.host.add_instance("mdpy", "mdpy-hd")
    mtty = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({mdpy: "done", mtty: "done"})
    assert manager_property(lab.bus, "ProbeCount") == 2
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--address", lab.bus.address, "--dest", BUS_NAME],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        lab.host.remove_instance(mtty)
        lab.host.reload_module("mtty", version="0.2")
        again = lab.host.add_instance("mtty", "mtty-1")
        lab.wait_states({again: "done", mdpy: "done"})
        assert manager_property(lab.bus, "ProbeCount") == 3
        caps = capabilities(lab.bus, again)
        assert caps["DriverVersion"] == "0.2"
        assert capabilities(lab.bus, mdpy)["ProbedAt"] > 0
        time.sleep(0.5)
    finally:
        monitor.terminate()
        output = monitor.communicate(timeout=10)[0]
    assert "CacheInvalidated ('mtty', '0.1', '0.2', uint32 1)" in output
    assert "CacheInvalidated ('mdpy'" not in output
    assert sorted(history_rows(lab)) == [
        ("mdpy", "mdpy-hd", "ok"),
        ("mtty", "mtty-1", "ok"),
        ("mtty", "mtty-1", "ok"),
    ]
    assert daemon.alive()


def test_a_failure_is_cached_and_retried_after_backoff(lab: Lab) -> None:
    lab.host.build("gvtg")
    lab.start("--probe-retry-seconds", "3")
    first = lab.host.add_instance("i915", "i915-GVTg_V5_4")
    lab.wait_states({first: "failed"})
    caps = capabilities(lab.bus, first)
    assert "KVM is required" in caps["LastError"]
    assert manager_property(lab.bus, "ProbeCount") == 1
    second = lab.host.add_instance("i915", "i915-GVTg_V5_4")
    lab.wait_states({second: "failed"})
    assert manager_property(lab.bus, "ProbeCount") == 1, "a cached failure must not re-probe"
    wait_until(lambda: manager_property(lab.bus, "ProbeCount") == 2, 15, "the retry", 0.2)
    with sqlite3.connect(lab.directory / "cache" / "capabilities.sqlite") as db:
        (failures, retry_at, probed_at) = db.execute(
            "SELECT failures, retry_at_us, probed_at_us FROM capabilities"
        ).fetchone()
    assert failures >= 1
    assert retry_at > probed_at


def test_a_busy_device_is_not_disturbed_and_its_sibling_answers(lab: Lab) -> None:
    lab.host.build("mtty")
    busy = "0b0b0b0b-0000-4000-8000-00000000b051"
    lab.overrides({"devices": {busy: {"busy": True}}})
    lab.start("--probe-retry-seconds", "60")
    lab.host.add_instance("mtty", "mtty-1", uuid=busy)
    lab.wait_states({busy: "busy"})
    assert "busy" in capabilities(lab.bus, busy)["ProbeState"]
    sibling = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({sibling: "done", busy: "done"})
    assert capabilities(lab.bus, busy)["Display"] == "none"


def test_a_corrupt_database_is_set_aside_and_rebuilt(lab: Lab) -> None:
    cache = lab.directory / "cache"
    cache.mkdir()
    garbage = os.urandom(32 * 1024)
    (cache / "capabilities.sqlite").write_bytes(garbage)
    lab.host.build("mtty")
    daemon = lab.start()
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({uuid: "done"})
    assert manager_property(lab.bus, "CacheState") == "ok"
    (aside,) = cache.glob("capabilities.sqlite.corrupt-*")
    assert aside.read_bytes() == garbage
    assert "moved to" in daemon.log()
