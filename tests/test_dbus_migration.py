"""Migration facts on the bus: per-configuration verdicts, round-trip figures, conditions."""

from __future__ import annotations

import json
from typing import Any

from support.daemon_lab import Lab, capabilities, device_object_path
from support.harness import BUS_NAME, busctl

DEVICE = "org.vfiocaps1.Device"
MANAGER = "org.vfiocaps1.Manager"


def get(lab: Lab, path: str, name: str) -> Any:
    out = busctl(
        lab.bus.address, "get-property", "--json=short", BUS_NAME, path, DEVICE, name
    )  # fmt: skip
    answer = json.loads(out.stdout)
    return answer["type"], answer["data"]


def test_mtty_reads_unsupported_with_defaults_and_supported_with_its_options(lab: Lab) -> None:
    lab.host.build("mtty")
    lab.start()
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({uuid: "done"})
    path = device_object_path(lab.bus, uuid)
    assert get(lab, path, "Migration") == ("s", "unsupported")
    assert get(lab, path, "MigrationBlockers") == (
        "as",
        ["ram_save_setup failed: Operation not supported"],
    )
    assert get(lab, path, "MigrationOptions") == (
        "a(ss)",
        [["x-device-dirty-page-tracking", "off"], ["enable-migration", "on"]],
    )
    assert get(lab, path, "MigrationWithOptions") == ("s", "supported")
    assert get(lab, path, "MigrationStateBytes") == ("t", 60)
    kind, save = get(lab, path, "MigrationSaveSeconds")
    assert kind == "d"
    assert save > 0
    kind, load = get(lab, path, "MigrationLoadSeconds")
    assert kind == "d"
    assert load > 0
    kind, conditions = get(lab, path, "MigrationConditions")
    assert kind == "a(ssss)"
    alone = next(c for c in conditions if c[0] == "alone")
    assert alone[1:3] == ["supported", "qemu"]
    assert "x-device-dirty-page-tracking=off" in alone[3]
    answer = capabilities(lab.bus, uuid)
    assert answer["MigrationWithOptions"] == "supported"
    assert answer["MigrationOptions"] == [
        ["x-device-dirty-page-tracking", "off"],
        ["enable-migration", "on"],
    ]


def test_a_device_without_migration_reads_unsupported_both_ways(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    uuid = lab.host.add_instance("mdpy", "mdpy-vga")
    lab.wait_states({uuid: "done"})
    path = device_object_path(lab.bus, uuid)
    assert get(lab, path, "Migration") == ("s", "unsupported")
    assert get(lab, path, "MigrationWithOptions") == ("s", "unsupported")
    assert get(lab, path, "MigrationOptions") == ("a(ss)", [])
    assert get(lab, path, "MigrationStateBytes") == ("t", 0)
