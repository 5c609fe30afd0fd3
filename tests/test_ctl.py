"""``vfiocapsctl`` as a user runs it, against the real daemon on a private bus."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from functools import partial
from typing import Any

from support.daemon_lab import Lab, vfiocapsctl
from support.harness import ROOT_PATH, DaemonFactory, PrivateBus, wait_until


def ctl_json(bus: PrivateBus, *args: str) -> Any:
    result = vfiocapsctl(bus, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_command_in_tables_and_json(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    mtty = lab.host.add_instance("mtty", "mtty-1")
    mbochs = lab.host.add_instance("mbochs", "mbochs-small")
    lab.wait_states({mtty: "done", mbochs: "done"})

    status = ctl_json(lab.bus, "status")
    assert status["DeviceCount"] == 2
    assert status["ProbeCount"] == 2
    assert status["CacheState"] == "ok"
    assert "DeviceCount" in vfiocapsctl(lab.bus, "status").stdout

    listed = vfiocapsctl(lab.bus, "list")
    assert listed.returncode == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "DRIVER", "STATE", "DISPLAY", "GL", "MIGRATION"]
    assert any(row.split()[:7] == [mbochs, "mbochs-small", "mbochs", "done", "dmabuf", "yes",
                                   "unsupported"] for row in rows)  # fmt: skip
    assert {d["Id"] for d in ctl_json(lab.bus, "list")} == {mtty, mbochs}

    shown = ctl_json(lab.bus, "show", mtty)
    assert shown["Display"] == "none"
    assert shown["Migration"] == "unsupported"  # with QEMU's defaults
    assert shown["MigrationWithOptions"] == "supported"
    assert shown["MigrationNotes"]
    text = vfiocapsctl(lab.bus, "show", mtty).stdout
    assert (
        "with options  supported with x-device-dirty-page-tracking=off, enable-migration=on" in text
    )
    assert re.search(r"^  condition +alone: supported \(decided by qemu\)", text, re.M)
    assert re.search(r"^  round trip +60 bytes of device state", text, re.M)
    assert shown["DomainXmlParts"]["hostdev"].startswith("<hostdev")
    text = vfiocapsctl(lab.bus, "show", mbochs).stdout
    assert f"{mbochs}: mdev of type mbochs-small" in text
    assert re.search(r"^  display +dmabuf: dma-buf display: needs OpenGL", text, re.M)
    assert re.search(r"^  OpenGL +required$", text, re.M)
    # This lab's dev root has no dri/: the host's answer says so, with the evidence.
    assert re.search(r"^  GL on host +no-render-node: no DRM render node", text, re.M)
    assert re.search(rf"^  gl +no DRM render node in {lab.dev}/dri", text, re.M)
    assert "QEMU 10.0.13" in text
    assert re.search(r"^  driver +mbochs", text, re.M)
    assert "blocker" in text
    assert "<graphics type='egl-headless'>" in text
    assert "type='spice'" in vfiocapsctl(lab.bus, "show", mbochs, "--viewer", "local").stdout

    types = ctl_json(lab.bus, "types")
    assert len(types) == 8
    assert "mbochs-small" in vfiocapsctl(lab.bus, "types").stdout

    xml = vfiocapsctl(lab.bus, "xml", mbochs)
    assert xml.returncode == 0
    assert xml.stdout.startswith("<hostdev mode='subsystem' type='mdev'")
    assert ctl_json(lab.bus, "xml", mtty)["Xml"].startswith("<hostdev")
    local = ctl_json(lab.bus, "xml", mbochs, "--viewer", "local")
    assert "type='spice'" in local["Parts"]["graphics"]
    assert local["Xml"].startswith(local["Parts"]["hostdev"])
    assert "<graphics type='egl-headless'>" in xml.stdout
    assert vfiocapsctl(lab.bus, "xml", mbochs, "--viewer", "vnc").returncode == 2

    refreshed = ctl_json(lab.bus, "refresh", mtty)
    assert refreshed["ProbeState"] == "done"
    assert refreshed["Emulated"] is False
    # In text, the fresh answer as show prints it: no Python reprs, times in UTC.
    fresh = vfiocapsctl(lab.bus, "refresh", mtty).stdout
    assert fresh.startswith(f"{mtty}: mdev of type mtty-1"), fresh
    assert re.search(r"^  probed +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", fresh, re.M), fresh
    assert "[" not in fresh.split("libvirt domain XML")[0]
    assert ctl_json(lab.bus, "invalidate", "mbochs") == {"Records": 1}
    assert vfiocapsctl(lab.bus, "invalidate", "nvidia").stdout.strip() == "0 records dropped"


def test_exit_codes_scripts_can_rely_on(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    start_daemon()
    missing = vfiocapsctl(private_bus, "show", "6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01")
    assert missing.returncode == 5
    assert missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("vfiocapsctl: no device")
    malformed = vfiocapsctl(private_bus, "xml", "not a device")
    assert malformed.returncode == 2
    assert "not a UUID, PCI address or absolute sysfs path" in malformed.stderr
    bad_driver = vfiocapsctl(private_bus, "invalidate", "../etc")
    assert bad_driver.returncode == 2
    usage = vfiocapsctl(private_bus, "frobnicate")
    assert usage.returncode == 2


def test_no_daemon_is_exit_status_three(tmp_path: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vfiocaps.ctl", "--bus-address", "unix:path=/nonexistent", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3
    assert result.stderr.startswith("vfiocapsctl: cannot connect")


def test_no_daemon_on_a_live_bus_is_exit_status_three(private_bus: PrivateBus) -> None:
    result = vfiocapsctl(private_bus, "status")
    assert result.returncode == 3
    assert "org.vfiocaps" in result.stderr


def test_monitor_streams_changes(lab: Lab) -> None:
    """Every step waits for what it needs to have happened (each monitor's subscription as the
    bus reports it, the events as the monitors print them), never for a stretch of time: on a
    loaded machine a monitor may take many seconds to start."""
    lab.host.build("mtty")
    lab.start()
    monitors = {
        name: subprocess.Popen(
            [sys.executable, "-m", "vfiocaps.ctl", "--bus-address", lab.bus.address, "monitor",
             *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, flags in (("json", ["--json"]), ("text", []))
    }  # fmt: skip
    printed: dict[str, list[str]] = {name: [] for name in monitors}

    def read(name: str) -> None:
        stream = monitors[name].stdout
        assert stream is not None
        printed[name].extend(iter(stream.readline, ""))

    readers = [threading.Thread(target=read, args=(name,), daemon=True) for name in monitors]
    for reader in readers:
        reader.start()

    def subscribed(monitor: subprocess.Popen[str]) -> bool:
        return any(ROOT_PATH in rule for rule in lab.bus.match_rules_of(monitor.pid))

    def removal_printed() -> bool:
        return any('"DeviceCount": 0' in line for line in printed["json"]) and any(
            "DeviceCount=0" in line for line in printed["text"]
        )

    errors: dict[str, str] = {}
    try:
        for name, monitor in monitors.items():
            wait_until(partial(subscribed, monitor), 120, f"the {name} monitor's subscription")
        uuid = lab.host.add_instance("mtty", "mtty-2")
        lab.wait_states({uuid: "done"})
        lab.host.remove_instance(uuid)
        wait_until(removal_printed, 120, "both monitors to print the removal", interval=0.1)
    finally:
        for name, monitor in monitors.items():
            monitor.send_signal(signal.SIGINT)
            monitor.wait(120)
            assert monitor.stderr is not None
            errors[name] = monitor.stderr.read()
            monitor.stderr.close()
        for reader in readers:
            reader.join(120)
    lines = "".join(printed["text"])
    # In text: the device by its id, values as show prints them.
    assert lines.splitlines()[0].startswith(f"device-added {uuid} "), lines + errors["text"]
    assert "/org/vfiocaps/devices" not in lines
    assert "['" not in lines
    assert re.search(r"ProbedAt=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", lines), lines
    assert re.search(r"MigrationSaveSeconds=\d+\.\d{3} s", lines), lines
    assert f"device-removed {uuid}" in lines
    # Interrupted, as shells report SIGINT.
    assert monitors["json"].returncode == 130, errors["json"]
    events = [json.loads(line) for line in printed["json"]]
    kinds = [event["Event"] for event in events]
    assert kinds[0] == "device-added"
    assert events[0]["Id"] == uuid
    assert all(event["Emulated"] is False for event in events)
    device_events = [event for event in events if event["Event"].startswith("device-")]
    assert all(event["Id"] == uuid for event in device_events)  # by id, removal included
    assert any(e["Event"] == "device-changed" and e.get("ProbeState") == "done" for e in events)
    assert "device-removed" in kinds
    assert kinds.index("device-removed") > kinds.index("device-added")
    assert any(e["Event"] == "manager-changed" and e.get("DeviceCount") == 0 for e in events)
