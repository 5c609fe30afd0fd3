"""Probing a type nobody instantiated: a temporary instance is created, probed and removed."""

from __future__ import annotations

import json

from support.daemon_lab import Lab, list_types, manager_property
from support.harness import BUS_NAME, ROOT_PATH, busctl, wait_until

MANAGER = "org.vfiocaps1.Manager"


def test_probe_type_creates_probes_and_removes_an_instance(lab: Lab) -> None:
    lab.host.build("samples")
    daemon = lab.start()
    out = busctl(
        lab.bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH, MANAGER, "ProbeType",
        "ss", "mdpy", "mdpy-vga", timeout=120,
    )  # fmt: skip
    answer = {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}
    assert answer["Probed"] is True
    assert answer["Display"] == "region"
    assert answer["GlRequired"] is False
    wait_until(lambda: manager_property(lab.bus, "DeviceCount") == 0, 10, "the removal")
    assert list_types(lab.bus)[("mdpy", "mdpy-vga")]["Instances"] == 0
    assert manager_property(lab.bus, "ProbeCount") == 1
    assert "created temporary instance" in daemon.log()
    assert "removed temporary instance" in daemon.log()
    # a second request is answered from the cache: no instance, no probe
    busctl(lab.bus.address, "call", BUS_NAME, ROOT_PATH, MANAGER, "ProbeType", "ss", "mdpy",
           "mdpy-vga")  # fmt: skip
    assert manager_property(lab.bus, "ProbeCount") == 1
    assert daemon.log().count("created temporary instance") == 1


def test_probe_type_rejects_bad_names_and_unknown_types(lab: Lab) -> None:
    lab.host.build("mtty")
    lab.start()
    bad = busctl(lab.bus.address, "call", BUS_NAME, ROOT_PATH, MANAGER, "ProbeType", "ss",
                 "../mtty", "mtty-1", check=False)  # fmt: skip
    assert "not a valid parent name" in bad.stderr
    unknown = busctl(lab.bus.address, "call", BUS_NAME, ROOT_PATH, MANAGER, "ProbeType", "ss",
                     "mtty", "mtty-9", check=False)  # fmt: skip
    assert "no mdev type 'mtty-9'" in unknown.stderr
    assert manager_property(lab.bus, "DeviceCount") == 0


def test_opt_in_probes_every_uninstantiated_type_by_itself(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start("--probe-types-without-instances")
    wait_until(
        lambda: all(t["Probed"] for t in list_types(lab.bus).values()),
        120,
        "every type probed",
        0.5,
    )
    # The last type is answered just before its temporary instance is removed.
    wait_until(lambda: manager_property(lab.bus, "DeviceCount") == 0, 10, "every removal")
    known = list_types(lab.bus)
    assert len(known) == 8
    assert known[("mbochs", "mbochs-large")]["Display"] == "dmabuf"
    assert known[("mtty", "mtty-2")]["MigrationWithOptions"] == "supported"
    assert all(t["Instances"] == 0 for t in known.values())
    assert manager_property(lab.bus, "ProbeCount") == 8


def test_without_the_opt_in_nothing_is_created(lab: Lab) -> None:
    lab.host.build("samples")
    daemon = lab.start()
    wait_until(lambda: "event Resynchronised" in daemon.log(), 10, "coldplug")
    assert not any(t["Probed"] for t in list_types(lab.bus).values())
    assert manager_property(lab.bus, "ProbeCount") == 0
    assert "created temporary instance" not in daemon.log()


def test_every_type_listtypes_shows_can_be_probed_by_its_name(lab: Lab) -> None:
    """One rule for type names: sysfs names with punctuation and spaces are listed and taken
    by ProbeType as they are; a name that is not safe as a path component is neither."""
    lab.host.build("oddnames")
    daemon = lab.start()
    wait_until(lambda: "event Resynchronised" in daemon.log(), 10, "coldplug")
    listed = list_types(lab.bus)
    odd = {("mtty", "type~1"), ("mtty", "vgpu (A)"), ("mtty", "_x")}
    assert odd <= set(listed)
    assert not any("\n" in type_id for _, type_id in listed)
    for parent, type_id in sorted(listed):
        out = busctl(
            lab.bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH, MANAGER, "ProbeType",
            "ss", parent, type_id, timeout=120,
        )  # fmt: skip
        answer = {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}
        assert (answer["Parent"], answer["TypeId"]) == (parent, type_id)
        assert answer["Probed"] is True, answer
    refused = busctl(lab.bus.address, "call", BUS_NAME, ROOT_PATH, MANAGER, "ProbeType", "ss",
                     "mtty", "bad\nname", check=False)  # fmt: skip
    assert "not a valid mdev type id" in refused.stderr
    assert "unprintable" in refused.stderr
    assert "ListTypes" in refused.stderr
