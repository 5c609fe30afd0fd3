"""Discovery through the real daemon process under umockdev: coldplug, hotplug, drivers, storms."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator

import pytest

from support.harness import DaemonFactory, DaemonProcess, wait_until
from support.umockdev_hosts import GVTG, MBOCHS, MDPY, MTTY, NVIDIA, MockHost

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

EVENT_LINE = re.compile(r"\bevent (\w+)((?: [a-z]+=\S*)*)\s*$")


def events_in(log: str) -> list[tuple[str, dict[str, str]]]:
    """Every ``event <Kind> key=value...`` line of a daemon log, in order."""
    found = []
    for line in log.splitlines():
        match = EVENT_LINE.search(line)
        if match:
            fields = dict(item.split("=", 1) for item in match.group(2).split())
            found.append((match.group(1), fields))
    return found


def summary(events: list[tuple[str, dict[str, str]]]) -> list[tuple[str, ...]]:
    """The parts of events that tests compare: kind and identifying fields."""
    rows: list[tuple[str, ...]] = []
    for kind, fields in events:
        if kind in ("DeviceAdded", "DeviceRemoved"):
            rows.append(
                (kind, fields["id"], fields["kind"], fields["parent"], fields["type"],
                 fields["driver"], fields["version"])
            )  # fmt: skip
        elif kind == "ParentRegistered":
            rows.append((kind, fields["parent"], fields["driver"], fields["version"],
                         fields["types"]))  # fmt: skip
        elif kind == "ParentUnregistered":
            rows.append((kind, fields["parent"]))
        elif kind == "DriverChanged":
            rows.append((kind, fields["module"], fields["old"], fields["new"]))
        else:
            rows.append((kind, fields["parents"], fields["types"], fields["devices"]))
    return rows


@pytest.fixture
def mock_host() -> Iterator[MockHost]:
    host = MockHost().start()
    try:
        yield host
    finally:
        host.stop()


def start(start_daemon: DaemonFactory, host: MockHost, *extra: str) -> DaemonProcess:
    daemon = start_daemon(
        *host.daemon_args(), *extra, env=host.daemon_env(), wrapper=host.daemon_wrapper()
    )
    wait_until(lambda: "event Resynchronised" in daemon.log(), 20, "the coldplug")
    return daemon


def new_events(daemon: DaemonProcess, seen: int, count: int, timeout: float = 20) -> list:
    """Wait for *count* more event lines after the first *seen*; fail on any more after that."""
    wait_until(lambda: len(events_in(daemon.log())) >= seen + count, timeout, f"{count} events")
    time.sleep(0.3)  # anything extra would have been logged by now
    events = events_in(daemon.log())[seen:]
    assert len(events) == count, summary(events)
    return events


def module_digest(host: MockHost, relative: str) -> str:
    """The fingerprint the version rule gives a module without version and srcversion."""
    path = host.modules_root / os.uname().release / relative
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def types_of(spec: object) -> str:
    return ",".join(sorted(t.type_id for t in spec.types))  # type: ignore[attr-defined]


def test_coldplug_of_every_fixture_host(start_daemon: DaemonFactory, mock_host: MockHost) -> None:
    mock_host.build("samples")
    mock_host.build("nvidia")
    mock_host.build("gvtg")
    mock_host.build("pci")
    mtty_instance = mock_host.add_instance("mtty", "mtty-2")
    nvidia_instance = mock_host.add_instance("nvidia", "nvidia-593")
    daemon = start(start_daemon, mock_host, "--verbose")  # coldplugged devices are DEBUG lines
    events = events_in(daemon.log())
    rows = summary(events)
    parents = sorted(r for r in rows if r[0] == "ParentRegistered")
    assert [(r[1], r[2]) for r in parents] == [
        ("0000:00:02.0", "i915"),
        ("0000:41:00.0", "nvidia"),
        ("mbochs", "mbochs"),
        ("mdpy", "mdpy"),
        ("mtty", "mtty"),
    ]
    by_parent = {r[1]: r for r in parents}
    assert by_parent["mtty"][3] == "0.1"
    assert by_parent["0000:41:00.0"][3] == "550.54.14"
    # No MODULE_VERSION and no srcversion: the module file's fingerprint.
    for name in ("mdpy", "mbochs", "0000:00:02.0"):
        assert by_parent[name][3].startswith("sha256:"), by_parent[name]
    assert by_parent["mdpy"][3] == module_digest(mock_host, MDPY.module_file)
    assert by_parent["0000:00:02.0"][3] == module_digest(mock_host, GVTG.module_file)
    for spec in (MTTY, MDPY, MBOCHS, NVIDIA, GVTG):
        assert by_parent[spec.name][4] == types_of(spec)
    fields = {f["parent"]: f for k, f in events if k == "ParentRegistered"}
    assert fields["0000:41:00.0"]["pci"] == "10de:2236"
    assert fields["0000:00:02.0"]["pci"] == "8086:3e92"
    assert fields["mtty"]["pci"] == "-"
    assert fields["mtty"]["source"] == "module-version"
    assert fields["mdpy"]["source"] == "module-file"
    devices = sorted(r for r in rows if r[0] == "DeviceAdded")
    assert devices == sorted(
        [
            ("DeviceAdded", mtty_instance, "mdev", "mtty", "mtty-2", "mtty", "0.1"),
            (
                "DeviceAdded",
                nvidia_instance,
                "mdev",
                "0000:41:00.0",
                "nvidia-593",
                "nvidia",
                "550.54.14",
            ),
            (
                "DeviceAdded",
                "0000:65:00.4",
                "pci",
                "-",
                "8086:1520",
                "vfio_pci",
                module_digest(mock_host, "kernel/vfio-pci.ko"),
            ),
            ("DeviceAdded", "0000:41:00.4", "pci", "0000:41:00.0", "594", "nvidia", "550.54.14"),
        ]
    )
    # The NIC bound to igb is not a VFIO device.
    assert not [f for _, f in events if "0000:66:00.0" in f.values()]  # not a VFIO device
    assert rows[-1] == ("Resynchronised", "5", "14", "4")
    assert daemon.stop() == 0


def test_coldplug_logs_each_device_only_at_debug(
    start_daemon: DaemonFactory, mock_host: MockHost
) -> None:
    mock_host.build("samples")
    present = mock_host.add_instance("mtty", "mtty-2")
    daemon = start(start_daemon, mock_host)
    kinds = [kind for kind, _ in events_in(daemon.log())]
    assert kinds == ["ParentRegistered"] * 3 + ["Resynchronised"]
    assert "devices=1" in daemon.log()
    assert f"id={present}" not in daemon.log()
    added = mock_host.add_instance("mdpy", "mdpy-vga")  # a change: logged at INFO
    (event,) = new_events(daemon, len(kinds), 1)
    assert summary([event])[0][:2] == ("DeviceAdded", added)
    assert daemon.stop() == 0


def test_hotplug_add_and_remove_instances(start_daemon: DaemonFactory, mock_host: MockHost) -> None:
    mock_host.build("samples")
    daemon = start(start_daemon, mock_host)
    seen = len(events_in(daemon.log()))
    first = mock_host.add_instance("mdpy", "mdpy-xga")
    second = mock_host.add_instance("mbochs", "mbochs-small")
    events = new_events(daemon, seen, 2)
    assert summary(events) == [
        ("DeviceAdded", first, "mdev", "mdpy", "mdpy-xga", "mdpy", summary(events)[0][6]),
        ("DeviceAdded", second, "mdev", "mbochs", "mbochs-small", "mbochs", summary(events)[1][6]),
    ]
    assert events[0][1]["group"] != "-"
    mock_host.remove_instance(first)
    events = new_events(daemon, seen + 2, 1)
    assert summary(events)[0][:2] == ("DeviceRemoved", first)
    mock_host.remove_instance(second)
    events = new_events(daemon, seen + 3, 1)
    assert summary(events)[0][:2] == ("DeviceRemoved", second)
    assert daemon.stop() == 0


def test_parent_unregister_and_register(start_daemon: DaemonFactory, mock_host: MockHost) -> None:
    mock_host.build("nvidia")
    daemon = start(start_daemon, mock_host)
    seen = len(events_in(daemon.log()))
    instance = mock_host.add_instance("nvidia", "nvidia-592")
    new_events(daemon, seen, 1)
    seen += 1
    mock_host.unregister_parent("nvidia")
    events = new_events(daemon, seen, 2)
    assert summary(events) == [
        ("DeviceRemoved", instance, "mdev", "0000:41:00.0", "nvidia-592", "nvidia", "550.54.14"),
        ("ParentUnregistered", "0000:41:00.0"),
    ]
    mock_host.register_parent("nvidia")
    events = new_events(daemon, seen + 2, 1)
    assert summary(events) == [
        ("ParentRegistered", "0000:41:00.0", "nvidia", "550.54.14", types_of(NVIDIA))
    ]
    assert daemon.stop() == 0


def test_driver_update_reports_old_and_new_version(
    start_daemon: DaemonFactory, mock_host: MockHost
) -> None:
    mock_host.build("samples")
    daemon = start(start_daemon, mock_host)
    seen = len(events_in(daemon.log()))
    instance = mock_host.add_instance("mtty", "mtty-1")
    new_events(daemon, seen, 1)
    seen += 1
    mock_host.reload_module("mtty", "0.2")
    events = new_events(daemon, seen, 4)
    assert summary(events) == [
        ("DeviceRemoved", instance, "mdev", "mtty", "mtty-1", "mtty", "0.1"),
        ("ParentUnregistered", "mtty"),
        ("DriverChanged", "mtty", "0.1", "0.2"),
        ("ParentRegistered", "mtty", "mtty", "0.2", types_of(MTTY)),
    ]
    # A module without a version: a new build is a new fingerprint.
    before = next(f for k, f in events_in(daemon.log()) if k == "ParentRegistered"
                  and f["parent"] == "mdpy")  # fmt: skip
    mock_host.reload_module("mdpy")
    events = new_events(daemon, seen + 4, 3)
    rows = summary(events)
    assert rows[0] == ("ParentUnregistered", "mdpy")
    assert rows[1][:3] == ("DriverChanged", "mdpy", before["version"])
    assert rows[1][3].startswith("sha256:")
    assert rows[1][3] != before["version"]
    assert rows[2] == ("ParentRegistered", "mdpy", "mdpy", rows[1][3], types_of(MDPY))
    assert daemon.stop() == 0


def test_pci_functions_bound_to_vfio_pci_come_and_go(
    start_daemon: DaemonFactory, mock_host: MockHost
) -> None:
    mock_host.build("pci")
    daemon = start(start_daemon, mock_host)
    seen = len(events_in(daemon.log()))
    mock_host.rebind_pci("0000:66:00.0", "vfio-pci", "vfio_pci")
    events = new_events(daemon, seen, 1)
    kind, fields = events[0]
    assert (kind, fields["id"], fields["kind"], fields["type"], fields["driver"]) == (
        "DeviceAdded",
        "0000:66:00.0",
        "pci",
        "8086:1521",
        "vfio_pci",
    )
    assert fields["group"].startswith("9")
    mock_host.rebind_pci("0000:66:00.0", "igb")
    mock_host.rebind_pci("0000:65:00.4", "igb")
    events = new_events(daemon, seen + 1, 2)
    assert [(k, f["id"]) for k, f in events] == [
        ("DeviceRemoved", "0000:66:00.0"),
        ("DeviceRemoved", "0000:65:00.4"),
    ]
    assert daemon.stop() == 0


@pytest.mark.slow
def test_storm_of_a_thousand_instances(start_daemon: DaemonFactory, mock_host: MockHost) -> None:
    count = 1000
    mock_host.build("mtty", capacity={"mtty-1": count + 24})
    daemon = start(start_daemon, mock_host)
    seen = len(events_in(daemon.log()))
    storm = mock_host.storm("mtty", "mtty-1", count)
    wait_until(
        lambda: len(events_in(daemon.log())) >= seen + count, 120, f"{count} DeviceAdded events"
    )
    known = time.time()
    events = events_in(daemon.log())[seen:]
    assert [f["id"] for k, f in events if k == "DeviceAdded"] == storm["uuids"]
    assert all(k == "DeviceAdded" for k, _ in events)
    sending = storm["ended"] - storm["began"]
    total = known - storm["began"]
    print(
        f"storm: {4 * count} uevents for {count} instances sent in {sending:.2f} s; "
        f"all {count} known {total:.2f} s after the first"
    )
    assert total < 60
    assert daemon.stop() == 0
