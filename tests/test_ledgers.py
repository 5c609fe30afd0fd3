"""The one crash ledger: its file rules, its recovery loop, the three ledgers built on it, and
entries older versions left, still recovered after an upgrade."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vfiocaps.discovery.instances import InstanceLedger
from vfiocaps.discovery.profileledger import ProfileLedger, ProfileRecord
from vfiocaps.ledger import ENTRY_LIMIT, Ledger, LedgerFormat, Recovery
from vfiocaps.prober.grants import NodeGrants

BOOT = "3f2a9c1e-8d4b-4e6f-a1b2-c3d4e5f60718"
FIXTURES = Path(__file__).parent / "fixtures" / "ledgers"


def boot_file(tmp_path: Path, boot: str = BOOT) -> Path:
    path = tmp_path / "boot_id"
    path.write_text(boot + "\n")
    return path


# ---- the generic ledger ---------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    key: str
    boot: str
    writer: int = 0


def _decode(_name: str, values: Any) -> Note:
    return Note(str(values["key"]), str(values["boot"]), int(values.get("writer", 0)))


NOTES: LedgerFormat[Note] = LedgerFormat(
    what="note",
    name_of=lambda note: f"{note.key}.note",
    is_entry_name=lambda name: name.endswith(".note"),
    encode=lambda note: {"key": note.key, "boot": note.boot, "writer": note.writer},
    decode=_decode,
    valid=lambda note: note.key.isalnum() and note.writer >= 0,
    boot_of=lambda note: note.boot,
)


def notes(tmp_path: Path) -> Ledger[Note]:
    return Ledger(tmp_path / "notes", NOTES, boot_file(tmp_path))


def test_entries_are_written_read_and_removed(tmp_path: Path) -> None:
    ledger = notes(tmp_path)
    assert ledger.entries() == []
    assert ledger.add(Note("a", BOOT)) is True
    assert ledger.add(Note("b", BOOT, 7)) is True
    assert ledger.entries() == [Note("a", BOOT), Note("b", BOOT, 7)]
    assert stat.S_IMODE(ledger.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((ledger.directory / "a.note").stat().st_mode) == 0o600
    ledger.remove(Note("a", BOOT))
    assert ledger.names() == ["b.note"]


def test_an_exclusive_entry_is_written_once(tmp_path: Path) -> None:
    ledger = notes(tmp_path)
    assert ledger.add(Note("a", BOOT, 1), exclusive=True) is True
    assert ledger.add(Note("a", BOOT, 2), exclusive=True) is False
    assert ledger.entries() == [Note("a", BOOT, 1)]
    assert sorted(os.listdir(ledger.directory)) == ["a.note"]  # no staged file is left


def test_an_invalid_entry_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a valid note"):
        notes(tmp_path).add(Note("../x", BOOT))


def test_names_the_format_does_not_claim_are_left_alone(tmp_path: Path) -> None:
    ledger = notes(tmp_path)
    ledger.add(Note("a", BOOT))
    (ledger.directory / "1234.owner").write_text("")
    (ledger.directory / ".a.note.1.tmp").write_text("half")
    ledger.discard("1234.owner")
    ledger.discard("../a.note")
    assert ledger.entries() == [Note("a", BOOT)]
    assert sorted(os.listdir(ledger.directory)) == [".a.note.1.tmp", "1234.owner", "a.note"]


def _planted(ledger: Ledger[Note], tmp_path: Path) -> dict[str, Path]:
    """One entry of each kind the ledger must refuse, beside a good one."""
    ledger.add(Note("good", BOOT))
    directory = ledger.directory
    (directory / "corrupt.note").write_text("{not json")
    (directory / "wrongtype.note").write_text("[1, 2]")
    (directory / "invalid.note").write_text(json.dumps({"key": "x y", "boot": BOOT}))
    (directory / "elsewhere.note").write_text(json.dumps({"key": "other", "boot": BOOT}))
    (directory / "large.note").write_text(
        " " * ENTRY_LIMIT + json.dumps({"key": "large", "boot": BOOT})
    )
    target = tmp_path / "target.note"
    target.write_text(json.dumps({"key": "linked", "boot": BOOT}))
    (directory / "linked.note").symlink_to(target)
    (directory / "dir.note").mkdir()
    return {"target": target}


def test_corrupt_foreign_or_planted_entries_are_refused_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = notes(tmp_path)
    planted = _planted(ledger, tmp_path)
    with caplog.at_level(logging.ERROR, logger="vfiocaps.ledger"):
        assert ledger.entries() == [Note("good", BOOT)]
    refused = {
        r.getMessage().split()[3] for r in caplog.records if "refusing the note" in r.getMessage()
    }
    expected = {"corrupt", "wrongtype", "invalid", "elsewhere", "large", "linked"}
    assert {Path(p).stem for p in refused} >= expected
    assert planted["target"].exists()  # the link was removed, never followed
    assert sorted(os.listdir(ledger.directory)) == ["dir.note", "good.note"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a file of another user")
def test_an_entry_of_another_user_is_refused(tmp_path: Path) -> None:
    ledger = notes(tmp_path)
    ledger.add(Note("theirs", BOOT))
    os.chown(ledger.directory / "theirs.note", 65534, 65534)
    assert ledger.entries() == []
    assert ledger.names() == []


def test_recovery_drops_other_boots_leaves_live_writers_and_follows_undo(tmp_path: Path) -> None:
    ledger = notes(tmp_path)
    for note in (
        Note("oldboot", "an-earlier-boot", 1),
        Note("live", BOOT, 2),
        Note("undone", BOOT, 3),
        Note("gone", BOOT, 3),
        Note("kept", BOOT, 3),
    ):
        ledger.add(note)
    outcomes = {"undone": Recovery.UNDONE, "gone": Recovery.GONE, "kept": Recovery.KEEP}
    asked: list[str] = []

    def undo(note: Note) -> Recovery:
        asked.append(note.key)
        return outcomes[note.key]

    undone = ledger.recover(lambda note: note.writer == 2, undo)
    assert undone == [Note("undone", BOOT, 3)]
    assert sorted(asked) == ["gone", "kept", "undone"]
    assert ledger.names() == ["kept.note", "live.note"]


# ---- the three ledgers: the same rules -------------------------------------------------------


def _instance_tree(sys_root: Path, uuid: str) -> Path:
    """An mtty instance *uuid* of mtty-1 with its kernel links; returns its ``remove``."""
    parent_dir = sys_root / "devices" / "virtual" / "mtty" / "mtty"
    (parent_dir / "mdev_supported_types" / "mtty-1").mkdir(parents=True)
    (sys_root / "kernel" / "iommu_groups" / "9").mkdir(parents=True)
    device = parent_dir / uuid
    device.mkdir()
    (device / "remove").write_text("")
    (device / "mdev_type").symlink_to("../mdev_supported_types/mtty-1")
    (device / "iommu_group").symlink_to("../../../../kernel/iommu_groups/9")
    (sys_root / "bus" / "mdev" / "devices").mkdir(parents=True)
    (sys_root / "bus" / "mdev" / "devices" / uuid).symlink_to(
        f"../../../devices/virtual/mtty/mtty/{uuid}"
    )
    return device / "remove"


def test_a_linked_instance_record_is_never_followed(tmp_path: Path) -> None:
    """A record planted as a link to a well-formed record elsewhere: acting on it would remove
    an instance nobody recorded here. It is refused and the instance stays."""
    uuid = "5d1c2a7e-0b3f-4c8a-9e6d-2f4b8a1c3e02"
    remove = _instance_tree(tmp_path / "sys", uuid)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(json.dumps({"boot_id": BOOT, "pid": 999999, "uuid": uuid}))
    directory = tmp_path / "instances"
    directory.mkdir(mode=0o700)
    (directory / uuid).symlink_to(elsewhere)
    ledger = InstanceLedger(directory, boot_file(tmp_path), held=lambda _d, _g: False)
    assert ledger.remove_leftovers(tmp_path / "sys") == []
    assert remove.read_text() == ""
    assert not os.path.lexists(directory / uuid)
    assert elsewhere.exists()


def test_a_linked_profile_record_is_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text((FIXTURES / "profile-v1.json").read_text())
    directory = tmp_path / "profiles"
    directory.mkdir(mode=0o700)
    (directory / "0000:41:00.4.json").symlink_to(elsewhere)
    ledger = ProfileLedger(directory, boot_file(tmp_path))
    assert ledger.records() == []
    assert ledger.functions() == set()
    assert elsewhere.exists()


# ---- entries an older version left --------------------------------------------------------------


def test_an_instance_record_of_an_older_version_is_recovered(tmp_path: Path) -> None:
    text = (FIXTURES / "instance-v1.json").read_text()
    uuid = json.loads(text)["uuid"]
    remove = _instance_tree(tmp_path / "sys", uuid)
    directory = tmp_path / "instances"
    directory.mkdir(mode=0o700)
    (directory / uuid).write_text(text)
    ledger = InstanceLedger(directory, boot_file(tmp_path), held=lambda _d, _g: False)
    assert ledger.recorded() == [uuid]
    assert ledger.remove_leftovers(tmp_path / "sys") == [uuid]
    assert remove.read_text() == "1"
    assert ledger.recorded() == []


def test_a_profile_record_of_an_older_version_is_a_leftover(tmp_path: Path) -> None:
    directory = tmp_path / "profiles"
    directory.mkdir(mode=0o700)
    (directory / "0000:41:00.4.json").write_text((FIXTURES / "profile-v1.json").read_text())
    ledger = ProfileLedger(directory, boot_file(tmp_path))
    expected = ProfileRecord("0000:41:00.4", "1061", "0000:41:00.0", BOOT)
    assert ledger.records() == [expected]
    assert ledger.leftovers() == [expected]  # no pid: its writer is taken for dead


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to lend a device node")
def test_a_grant_record_of_an_older_version_is_given_back(tmp_path: Path) -> None:
    dev_root = tmp_path / "dev"
    (dev_root / "vfio").mkdir(parents=True)
    node = dev_root / "vfio" / "7"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.chown(node, 65534, 0)
    st = node.stat()
    journal = tmp_path / "grants"
    journal.mkdir(mode=0o700)
    text = (FIXTURES / "grant-v1.json").read_text()
    text = text.replace("@NODE@", str(node)).replace("@RDEV@", str(st.st_rdev))
    text = text.replace("@INO@", str(st.st_ino))
    name = hashlib.sha256(os.fsencode(str(node))).hexdigest()[:32]
    (journal / f"999999-0a1b2c3d4e5f-{name}.json").write_text(text)
    grants = NodeGrants(journal=journal, dev_root=dev_root, boot_id_path=boot_file(tmp_path))
    assert grants.recover(probe_uid=None) == [node]
    assert (node.stat().st_uid, stat.S_IMODE(node.stat().st_mode)) == (0, 0o600)
    assert sorted(journal.glob("*.json")) == []
