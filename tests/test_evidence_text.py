"""QEMU and driver text reaches storage, the bus, terminals and XML without control codes."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from support.daemon_lab import Lab, capabilities, vfiocapsctl
from vfiocaps.capabilities import (
    Capabilities,
    Decider,
    Display,
    Migration,
    MigrationCondition,
    ProbeOutcome,
    ProbeReport,
    clean_report,
    printable,
)
from vfiocaps.store.records import CapabilityKey, CapabilityRecord
from vfiocaps.store.rows import record_to_row, row_to_record

# A title change (OSC), a colour through the 8-bit CSI, a bell, a carriage return, a NUL.
HOSTILE = "bad \x1b]0;owned\x07state \x9b31mred\x1b[0m\r\x00end"
CONTROLS = [chr(c) for c in (*range(0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))]


def test_printable_drops_every_c0_and_c1_control_but_tab_and_newline() -> None:
    assert printable("".join(CONTROLS)) == ""
    assert printable("a\tb\nc é ✓") == "a\tb\nc é ✓"
    assert printable(HOSTILE) == "bad ]0;ownedstate 31mred[0mend"


def test_a_report_is_cleaned_in_every_text_field() -> None:
    caps = Capabilities(
        display=Display.NONE,
        gl_required=False,
        migration=Migration.UNSUPPORTED,
        migration_blockers=(HOSTILE,),
        migration_notes=(HOSTILE,),
        qemu_version=HOSTILE,
        migration_options=((HOSTILE, HOSTILE),),
        migration_conditions=(
            MigrationCondition(HOSTILE, Migration.UNSUPPORTED, Decider.QEMU, HOSTILE),
        ),
        gl_detail=HOSTILE,
    )
    report = ProbeReport(ProbeOutcome.OK, caps, HOSTILE, HOSTILE, notes=(HOSTILE,))
    text = repr(clean_report(report))
    assert not any(control in text for control in ("\x1b", "\x9b", "\x07", "\r", "\x00"))
    assert repr(printable(HOSTILE)) in text


def test_a_row_an_older_version_stored_is_cleaned_when_read() -> None:
    key = CapabilityKey("mtty", "0.1", "6.12", "", "mtty-1", "/usr/bin/qemu", "10.0.3", 1)
    caps = Capabilities(Display.NONE, False, Migration.UNSUPPORTED, migration_blockers=(HOSTILE,))
    row = record_to_row(CapabilityRecord(key, ProbeOutcome.OK, caps, HOSTILE, probed_at_us=1))
    record = row_to_record(row)
    assert record.error == printable(HOSTILE)
    assert record.capabilities is not None
    assert record.capabilities.migration_blockers == (printable(HOSTILE),)


@pytest.mark.skipif(shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed")
def test_a_destinations_escape_sequence_reaches_no_terminal_and_no_xml(lab: Lab) -> None:
    lab.host.build("mtty")
    uuid = "0b0b0b0b-0000-4000-8000-0000000e5c01"
    lab.overrides({"devices": {uuid: {"profile": "saves-not-loads", "load_error": HOSTILE}}})
    lab.start()
    lab.host.add_instance("mtty", "mtty-1", uuid=uuid)
    lab.wait_states({uuid: "done"})
    blockers = capabilities(lab.bus, uuid)["MigrationBlockers"]
    assert any("ownedstate" in blocker for blocker in blockers), blockers
    shown = vfiocapsctl(lab.bus, "show", uuid)
    assert shown.returncode == 0, shown.stderr
    assert "ownedstate" in shown.stdout
    xml = vfiocapsctl(lab.bus, "xml", uuid)
    assert xml.returncode == 0, xml.stderr
    for output in (shown.stdout, xml.stdout, "".join(blockers)):
        assert not any(control in output for control in ("\x1b", "\x9b", "\x07", "\r", "\x00"))
    with sqlite3.connect(lab.directory / "cache" / "capabilities.sqlite") as db:
        stored = "".join(str(row) for row in db.execute("SELECT * FROM capabilities"))
    assert "ownedstate" in stored
    assert "\x1b" not in stored
