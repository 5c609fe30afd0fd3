"""The device objects as D-Bus clients see them: the object tree, the standard interfaces, the
errors for what a device object does not have, and PropertiesChanged when an answer changes."""

from __future__ import annotations

import json
import subprocess
import time

from support.daemon_lab import Lab, device_object_path
from support.harness import BUS_NAME, ROOT_PATH, busctl, gdbus

DEVICE = "org.vfiocaps1.Device"
MANAGER = "org.vfiocaps1.Manager"
PROPERTIES = "org.freedesktop.DBus.Properties"
DEVICES_PATH = f"{ROOT_PATH}/devices"


def _call(
    lab: Lab, path: str, interface: str, member: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return busctl(
        lab.bus.address, "call", "--json=short", BUS_NAME, path, interface, member, *args,
        check=False,
    )  # fmt: skip


def test_the_object_tree_leads_to_every_device(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    devices = [lab.host.add_instance(m, t) for m, t in (("mdpy", "mdpy-vga"), ("mtty", "mtty-1"))]
    lab.wait_states(dict.fromkeys(devices, "done"))
    paths = {device_object_path(lab.bus, device) for device in devices}
    tree = busctl(lab.bus.address, "tree", "--list", BUS_NAME).stdout.split()
    assert paths <= set(tree)
    assert {ROOT_PATH, DEVICES_PATH} <= set(tree)
    root = gdbus(
        lab.bus.address, "introspect", "--dest", BUS_NAME, "--object-path", ROOT_PATH
    ).stdout
    assert "node devices" in root
    listing = gdbus(
        lab.bus.address, "introspect", "--dest", BUS_NAME, "--object-path", DEVICES_PATH
    ).stdout
    for path in paths:
        assert f"node {path.rsplit('/', 1)[1]}" in listing
    lab.host.remove_instance(devices[0])
    lab.wait_states({devices[1]: "done"})
    for _ in range(100):
        tree = busctl(lab.bus.address, "tree", "--list", BUS_NAME).stdout.split()
        if len(paths & set(tree)) == 1:
            break
        time.sleep(0.05)
    assert paths & set(tree) == {device_object_path(lab.bus, devices[1])}


def test_standard_interfaces_and_their_errors(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    uuid = lab.host.add_instance("mdpy", "mdpy-vga")
    lab.wait_states({uuid: "done"})
    path = device_object_path(lab.bus, uuid)
    got = _call(lab, path, PROPERTIES, "Get", "ss", DEVICE, "Display")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["data"][0] == {"type": "s", "data": "region"}
    everything = json.loads(_call(lab, path, PROPERTIES, "GetAll", "s", DEVICE).stdout)["data"][0]
    assert everything["Id"]["data"] == uuid
    standard = _call(lab, path, PROPERTIES, "GetAll", "s", PROPERTIES)
    assert json.loads(standard.stdout)["data"] == [{}]
    assert _call(lab, path, "org.freedesktop.DBus.Peer", "Ping").returncode == 0
    refusals = {
        "PropertyReadOnly": ("Set", f"'{DEVICE}'", "'Display'", "<'none'>"),
        "UnknownProperty": ("Get", f"'{DEVICE}'", "'Colour'"),
        "UnknownInterface": ("GetAll", "'org.example.Nothing'"),
    }
    for error, (member, *args) in refusals.items():
        refused = _gdbus_call(lab, path, f"{PROPERTIES}.{member}", *args)
        assert f"org.freedesktop.DBus.Error.{error}" in refused.stderr, (member, refused.stderr)
    unknown = _gdbus_call(lab, path, f"{DEVICE}.Explode")
    assert "org.freedesktop.DBus.Error.UnknownMethod" in unknown.stderr
    gone = _gdbus_call(lab, f"{DEVICES_PATH}/nothing_here", f"{PROPERTIES}.GetAll", f"'{DEVICE}'")
    assert gone.returncode != 0
    assert _call(lab, path, PROPERTIES, "Get", "ss", DEVICE, "Display").returncode == 0


def _gdbus_call(lab: Lab, path: str, method: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A call with gdbus, which prints the D-Bus error name (busctl prints only the message)."""
    return gdbus(
        lab.bus.address, "call", "--dest", BUS_NAME, "--object-path", path, "--method", method,
        *args, check=False,
    )  # fmt: skip


def test_a_changed_answer_is_signalled_on_the_device_path(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({uuid: "done"})
    path = device_object_path(lab.bus, uuid)
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--address", lab.bus.address, "--dest", BUS_NAME,
         "--object-path", path],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        refreshed = _call(lab, ROOT_PATH, MANAGER, "Refresh", "s", uuid)
        assert refreshed.returncode == 0, refreshed.stderr
        time.sleep(0.5)
    finally:
        monitor.terminate()
    output = monitor.communicate(timeout=10)[0]
    assert f"{path}: {PROPERTIES}.PropertiesChanged ('{DEVICE}'" in output
    assert "'ProbedAt': <uint64" in output
