"""Device objects on the bus: contract, ObjectManager signals, property changes, XML, refresh."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from support import contract
from support.daemon_lab import Lab, capabilities, device_object_path, manager_call, manager_property
from support.harness import BUS_NAME, ROOT_PATH, busctl, gdbus
from support.libvirt_domain import minimal_domain, validate

DEVICE = "org.vfiocaps1.Device"
MANAGER = "org.vfiocaps1.Manager"


class Monitor:
    """``gdbus monitor`` on the daemon, collecting what it prints."""

    def __init__(self, lab: Lab) -> None:
        self.process = subprocess.Popen(
            ["gdbus", "monitor", "--address", lab.bus.address, "--dest", BUS_NAME],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)

    def stop(self) -> str:
        time.sleep(0.5)
        self.process.terminate()
        return self.process.communicate(timeout=10)[0]


def test_device_interface_equals_the_contract(lab: Lab) -> None:
    lab.host.build("mtty")
    lab.start()
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({uuid: "done"})
    xml = busctl(
        lab.bus.address,
        "introspect",
        "--xml-interface",
        BUS_NAME,
        device_object_path(lab.bus, uuid),
    )
    assert contract.interfaces(xml.stdout)[DEVICE] == contract.contract()[DEVICE]


def test_managed_objects_hold_what_get_all_gives(lab: Lab) -> None:
    """GetManagedObjects takes every device's properties at once: the same values and types as
    Properties.GetAll, for devices of different kinds and answers."""
    lab.host.build("samples")
    lab.start()
    devices = [lab.host.add_instance(m, t) for m, t in (("mdpy", "mdpy-vga"), ("mtty", "mtty-2"))]
    lab.wait_states(dict.fromkeys(devices, "done"))
    out = busctl(
        lab.bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH,
        "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
    )  # fmt: skip
    objects = json.loads(out.stdout)["data"][0]
    assert len(objects) == len(devices)
    for device_id in devices:
        path = device_object_path(lab.bus, device_id)
        out = busctl(
            lab.bus.address, "call", "--json=short", BUS_NAME, path,
            "org.freedesktop.DBus.Properties", "GetAll", "s", DEVICE,
        )  # fmt: skip
        assert objects[path] == {DEVICE: json.loads(out.stdout)["data"][0]}


def test_devices_come_and_go_with_object_manager_signals(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    monitor = Monitor(lab)
    uuid = lab.host.add_instance("mdpy", "mdpy-vga")
    lab.wait_states({uuid: "done"})
    path = device_object_path(lab.bus, uuid)
    lab.host.remove_instance(uuid)
    for _ in range(100):
        if uuid not in lab.states():
            break
        time.sleep(0.05)
    output = monitor.stop()
    added = [line for line in output.splitlines() if "InterfacesAdded" in line]
    removed = [line for line in output.splitlines() if "InterfacesRemoved" in line]
    assert len(added) == 1
    assert added[0].startswith(f"{ROOT_PATH}: org.freedesktop.DBus.ObjectManager.InterfacesAdded")
    assert f"objectpath '{path}'" in added[0]
    assert len(removed) == 1
    assert f"objectpath '{path}', ['{DEVICE}']" in removed[0]
    changes = [line for line in output.splitlines() if f"{path}: org.freedesktop.DBus.Prop" in line]
    assert any("'ProbeState': <'done'>" in line for line in changes)
    assert any("'Display': <'region'>" in line for line in changes)
    assert uuid not in lab.states()


def test_stopping_releases_the_name_without_a_signal_per_device(lab: Lab) -> None:
    lab.host.build("samples")
    daemon = lab.start()
    uuids = [lab.host.add_instance("mtty", "mtty-1") for _ in range(5)]
    lab.wait_states(dict.fromkeys(uuids, "done"))
    # dbus-monitor sees every message, also those sent after the name is gone.
    monitor = subprocess.Popen(
        ["dbus-monitor", "--address", lab.bus.address, "--monitor",
         f"type='signal',sender='{BUS_NAME}'", "type='signal',member='InterfacesRemoved'",
         "type='signal',member='NameOwnerChanged'"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.5)
    assert daemon.stop() == 0
    time.sleep(0.5)
    monitor.terminate()
    output = monitor.communicate(timeout=10)[0]
    assert f'string "{BUS_NAME}"' in output  # NameOwnerChanged: the name went
    assert "member=InterfacesRemoved" not in output


def test_ids_by_uuid_path_and_upper_case_name_the_same_device(lab: Lab) -> None:
    lab.host.build("mtty")
    lab.start()
    uuid = lab.host.add_instance("mtty", "mtty-2")
    lab.wait_states({uuid: "done"})
    by_uuid = capabilities(lab.bus, uuid)
    by_path = capabilities(lab.bus, f"/sys/bus/mdev/devices/{uuid}")
    by_upper = capabilities(lab.bus, uuid.upper())
    assert by_uuid == by_path == by_upper
    assert by_uuid["TypeId"] == "mtty-2"


def test_domain_xml_follows_the_truth(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    mtty = lab.host.add_instance("mtty", "mtty-1")
    mdpy = lab.host.add_instance("mdpy", "mdpy-xga")
    mbochs = lab.host.add_instance("mbochs", "mbochs-medium")
    lab.wait_states({mtty: "done", mdpy: "done", mbochs: "done"})
    xml_mtty = manager_call(lab.bus, "DomainXml", "s", mtty)[0]
    xml_mdpy = manager_call(lab.bus, "DomainXml", "s", mdpy)[0]
    xml_mbochs = manager_call(lab.bus, "DomainXml", "s", mbochs)[0]
    assert f"<address uuid='{mtty}'/>" in xml_mtty
    assert "display='off'" in xml_mtty
    assert "ramfb" not in xml_mtty
    assert "display='on' ramfb='on'" in xml_mdpy
    assert "<gl enable='yes'/>" not in xml_mdpy
    assert "display='on' ramfb='on'" in xml_mbochs
    assert "<graphics type='egl-headless'>" in xml_mbochs
    assert "Migration: unsupported" in xml_mbochs


def test_domain_xml_parts_validate_against_libvirt_schema(lab: Lab, tmp_path: Path) -> None:
    lab.host.build("samples")
    lab.start()
    mtty = lab.host.add_instance("mtty", "mtty-1")
    mdpy = lab.host.add_instance("mdpy", "mdpy-xga")
    mbochs = lab.host.add_instance("mbochs", "mbochs-medium")
    lab.wait_states({mtty: "done", mdpy: "done", mbochs: "done"})
    graphics: dict[tuple[str, str], str] = {}
    for device in (mtty, mdpy, mbochs):
        for viewer in ("local", "remote"):
            (answer,) = manager_call(lab.bus, "DomainXmlParts", "ss", device, viewer)
            parts = dict(answer)
            domain = minimal_domain(parts)
            result = validate(domain, tmp_path / device / viewer)
            assert result.returncode == 0, result.stderr + domain
            graphics[device, viewer] = parts.get("graphics", "")
            assert f"<address uuid='{device}'/>" in parts["hostdev"]
    assert graphics[mtty, "local"] == graphics[mtty, "remote"] == ""
    assert graphics[mdpy, "local"] == graphics[mdpy, "remote"] == "<graphics type='vnc'/>"
    assert "type='spice'" in graphics[mbochs, "local"]
    assert "type='egl-headless'" in graphics[mbochs, "remote"]
    # The lab has no DRM render node: the notes say so and no rendernode is named.
    assert "rendernode" not in graphics[mbochs, "remote"]
    assert "render node" in manager_call(lab.bus, "DomainXmlParts", "ss", mbochs, "")[0]["notes"]
    refused = busctl(
        lab.bus.address, "call", BUS_NAME, ROOT_PATH, MANAGER, "DomainXmlParts", "ss", mdpy,
        "vnc", check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "'local' or 'remote'" in refused.stderr


def test_list_types_reports_probed_types(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    uuid = lab.host.add_instance("mbochs", "mbochs-large")
    lab.wait_states({uuid: "done"})
    types = {
        (t["Parent"]["data"], t["TypeId"]["data"]): t for t in manager_call(lab.bus, "ListTypes")[0]
    }
    assert len(types) == 8
    large = types[("mbochs", "mbochs-large")]
    assert large["Instances"]["data"] == 1
    assert large["Probed"]["data"] is True
    assert large["Display"]["data"] == "dmabuf"
    assert large["GlRequired"]["data"] is True
    assert types[("mtty", "mtty-1")]["Probed"]["data"] is False
    assert types[("mtty", "mtty-1")]["AvailableInstances"]["data"] == 24


def test_refresh_and_invalidate_reprobe(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({uuid: "done"})
    before = capabilities(lab.bus, uuid)["ProbedAt"]
    fresh = manager_call(lab.bus, "Refresh", "s", uuid)[0]
    assert fresh["ProbeState"]["data"] == "done"
    assert fresh["ProbedAt"]["data"] > before
    assert manager_property(lab.bus, "ProbeCount") == 2
    device_fresh = gdbus(
        lab.bus.address, "call", "--dest", BUS_NAME,
        "--object-path", device_object_path(lab.bus, uuid), "--method", f"{DEVICE}.Refresh",
        timeout=120,
    )  # fmt: skip
    assert "'ProbeState': <'done'>" in device_fresh.stdout
    assert manager_property(lab.bus, "ProbeCount") == 3
    monitor = Monitor(lab)
    assert manager_call(lab.bus, "Invalidate", "s", "mtty") == [1]
    lab.wait_states({uuid: "done"})
    assert manager_property(lab.bus, "ProbeCount") == 4
    assert manager_call(lab.bus, "Invalidate", "s", "nvidia") == [0]
    output = monitor.stop()
    assert "CacheInvalidated ('mtty', '0.1', '0.1', uint32 1)" in output
    assert "CacheInvalidated ('nvidia', '', '', uint32 0)" in output
