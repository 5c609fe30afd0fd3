"""This boot's id where the unit hides /proc/sys (ProcSubset=pid), and what records compare."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from vfiocaps.bootid import UNKNOWN_BOOT, read_boot_id, same_boot
from vfiocaps.discovery.instances import InstanceLedger

BOOT = "4a1c8a52-3c1e-4a57-9a43-7c51d0f0b001"
OTHER = "9d0e1f2a-3c1e-4a57-9a43-7c51d0f0b002"


def test_the_boot_id_is_read_or_unknown(tmp_path: Path) -> None:
    path = tmp_path / "boot_id"
    assert read_boot_id(path) == UNKNOWN_BOOT  # hidden, as under ProcSubset=pid
    path.write_text(BOOT + "\n")
    assert read_boot_id(path) == BOOT
    path.write_text("../../etc\n")
    assert read_boot_id(path) == UNKNOWN_BOOT


def test_only_two_known_different_ids_are_different_boots() -> None:
    assert same_boot(BOOT, BOOT)
    assert not same_boot(BOOT, OTHER)
    assert same_boot(UNKNOWN_BOOT, BOOT)
    assert same_boot(BOOT, UNKNOWN_BOOT)
    assert same_boot(UNKNOWN_BOOT, UNKNOWN_BOOT)


def test_a_temporary_instance_is_recorded_where_the_boot_id_is_hidden(tmp_path: Path) -> None:
    """Under the shipped unit /proc/sys is hidden; a type probe must still record its instance
    (the real-kernel lab found ProbeType refused: "cannot read the boot id")."""
    ledger = InstanceLedger(tmp_path / "instances", boot_id_path=tmp_path / "missing")
    instance = str(uuid.uuid4())
    ledger.record(instance)
    entry = json.loads((tmp_path / "instances" / instance).read_text())
    assert entry["boot_id"] == UNKNOWN_BOOT
    assert ledger.recorded() == [instance]
    ledger.forget(instance)
    assert ledger.recorded() == []
