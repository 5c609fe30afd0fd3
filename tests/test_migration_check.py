"""Migration fingerprints over D-Bus and ``vfiocapsctl migration``, against the real daemon."""

from __future__ import annotations

import json
from pathlib import Path

from support.daemon_lab import Lab, manager_call, vfiocapsctl

MANAGER = "org.vfiocaps1.Manager"


def test_fingerprint_and_check_over_the_bus_and_the_command_line(lab: Lab, tmp_path: Path) -> None:
    lab.host.build("samples")
    lab.start()
    one = lab.host.add_instance("mtty", "mtty-1")
    two = lab.host.add_instance("mtty", "mtty-2")
    other_one = lab.host.add_instance("mtty", "mtty-1")
    mbochs = lab.host.add_instance("mbochs", "mbochs-small")
    lab.wait_states({one: "done", two: "done", other_one: "done", mbochs: "done"})

    (document,) = manager_call(lab.bus, "MigrationFingerprint", "s", two)
    values = json.loads(document)
    assert values["format"] == "vfiocaps-migration-fingerprint"
    assert (values["driver"], values["type_id"], values["device_api"]) == (
        "mtty",
        "mtty-2",
        "vfio-pci",
    )
    assert values["driver_version"] == "0.1"
    assert values["qemu_version"]
    assert values["migration_flags"] is None
    assert two not in document, "a fingerprint describes the type, not the instance"

    # The same type here: compatible, and the destination named.
    verdict, reasons = manager_call(lab.bus, "CheckMigration", "ss", document, "")
    assert verdict == "compatible", reasons
    assert reasons[0] == ["destination", "compatible", two]
    # mtty-2's state into an mtty-1: the type differs.
    verdict, reasons = manager_call(lab.bus, "CheckMigration", "ss", document, one)
    assert verdict == "incompatible"
    assert [r[0] for r in reasons[1:] if r[1] == "incompatible"] == ["type_id"]

    saved = tmp_path / "mtty-2.json"
    made = vfiocapsctl(lab.bus, "migration", "fingerprint", two, "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout) == values
    saved.write_text(made.stdout)
    shown = vfiocapsctl(lab.bus, "migration", "fingerprint", two).stdout
    assert "type_id" in shown
    assert "None" not in shown

    same = vfiocapsctl(lab.bus, "migration", "check", str(saved))
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines()[0] == "compatible"
    other = vfiocapsctl(lab.bus, "migration", "check", str(saved), "--device", one, "--json")
    assert other.returncode == 7, other.stderr
    answer = json.loads(other.stdout)
    assert answer["verdict"] == "incompatible"
    assert {"field": "type_id", "verdict": "incompatible"}.items() <= next(
        row for row in answer["reasons"] if row["field"] == "type_id"
    ).items()
    assert (
        "mtty-2" in vfiocapsctl(lab.bus, "migration", "check", str(saved), "--device", one).stdout
    )

    # A real host's fingerprint says so; one from an emulated host (the demo) never matches it.
    assert values["emulated"] is False
    emulated = dict(values, emulated=True)
    demo = vfiocapsctl(lab.bus, "migration", "check", "-", "--json", stdin=json.dumps(emulated))
    assert demo.returncode == 7, demo.stderr
    assert {"field": "emulated", "verdict": "incompatible"}.items() <= next(
        row for row in json.loads(demo.stdout)["reasons"] if row["field"] == "emulated"
    ).items()

    # Another driver version with no published state format: only the driver knows.
    newer = dict(values, driver_version="0.2")
    undecided = vfiocapsctl(lab.bus, "migration", "check", "-", stdin=json.dumps(newer))
    assert undecided.returncode == 8, undecided.stderr
    assert undecided.stdout.splitlines()[0] == "unknown"
    # A type that does not migrate here (mbochs) is never compatible.
    (mbochs_document,) = manager_call(lab.bus, "MigrationFingerprint", "s", mbochs)
    refused = vfiocapsctl(lab.bus, "migration", "check", "-", stdin=mbochs_document)
    assert refused.returncode == 7, refused.stdout
    # No probed device of the type here: unknown, and says what to do.
    absent = vfiocapsctl(
        lab.bus, "migration", "check", "-", stdin=json.dumps(dict(values, type_id="mtty-3"))
    )
    assert absent.returncode == 8
    assert "create an instance" in absent.stdout


def test_bad_fingerprints_and_devices_are_clear_errors(lab: Lab, tmp_path: Path) -> None:
    lab.host.build("samples")
    lab.start()
    one = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({one: "done"})
    error = manager_call(lab.bus, "CheckMigration", "ss", '{"format": "x"}', "", check=False)
    assert "org.vfiocaps1.Error.InvalidArgument" in error or "not a migration" in error
    nested = manager_call(lab.bus, "CheckMigration", "ss", "[" * 8000 + "]" * 8000, "", check=False)
    assert "nested deeper" in nested, nested
    document = json.loads(vfiocapsctl(lab.bus, "migration", "fingerprint", one, "--json").stdout)
    truthy = json.dumps({**document, "version": True})
    wrong = manager_call(lab.bus, "CheckMigration", "ss", truthy, "", check=False)
    assert "version True" in wrong, wrong
    assert "Traceback" not in lab.daemons[0].log()
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    bad = vfiocapsctl(lab.bus, "migration", "check", str(garbage))
    assert bad.returncode == 2
    assert bad.stderr.startswith("vfiocapsctl: not a usable fingerprint: not JSON")
    missing = vfiocapsctl(lab.bus, "migration", "check", str(tmp_path / "absent.json"))
    assert missing.returncode == 2
    assert "cannot read the fingerprint" in missing.stderr
    huge = vfiocapsctl(lab.bus, "migration", "check", "-", stdin=" " * 20000)
    assert huge.returncode == 2
    assert "larger than a fingerprint" in huge.stderr
    unknown = vfiocapsctl(
        lab.bus, "migration", "fingerprint", "6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01"
    )
    assert unknown.returncode == 5
    document = vfiocapsctl(lab.bus, "migration", "fingerprint", one, "--json").stdout
    gone = vfiocapsctl(
        lab.bus, "migration", "check", "-", "--device", "6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01",
        stdin=document,
    )  # fmt: skip
    assert gone.returncode == 5
