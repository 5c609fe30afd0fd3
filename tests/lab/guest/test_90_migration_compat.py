"""State saved from one mtty type, loaded into another: what the driver does, and whether the
daemon's migration fingerprint check (on the daemon's own fingerprints, which carry the kernel's
migration flags) predicts it, through vfiocapsctl and CheckMigration on the bus alike."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from labkit import MANAGER, ROOT_PATH, Daemon, migration_finished, qemu_vm, vfiocapsctl

# What mtty needs to migrate with QEMU 10 (see the capability table's notes).
OPTIONS = "display=off,x-device-dirty-page-tracking=off,enable-migration=on"
INCOMPATIBLE = "incompatible"
CHECK_EXIT = {0: "compatible", 7: INCOMPATIBLE, 8: "unknown"}


def save_state(mdev_uuid: str, workdir: Path) -> Path:
    """Migrate a paused QEMU holding *mdev_uuid* to a file; return the file."""
    stream = workdir / "state"
    stream.unlink(missing_ok=True)
    with qemu_vm(mdev_uuid, workdir / "source", OPTIONS) as (_, qmp):
        qmp.execute("migrate", uri=f"file:{stream}")
        answer = migration_finished(qmp)
    assert answer["status"] == "completed", answer
    return stream


def load_state(mdev_uuid: str, stream: Path, workdir: Path) -> dict[str, Any]:
    """Load *stream* into a fresh QEMU holding *mdev_uuid*; return query-migrate's last answer."""
    with qemu_vm(mdev_uuid, workdir, OPTIONS, ("-incoming", "defer")) as (_, qmp):
        qmp.execute("migrate-incoming", uri=f"file:{stream}", **{"exit-on-error": False})
        answer = migration_finished(qmp)
        answer["vm-status"] = qmp.execute("query-status")["status"]
        if answer["status"] == "completed":
            # Leave the device out of RESUMING (it stays there while the VM is paused).
            qmp.execute("cont")
            qmp.execute("stop")
    answer["log"] = (workdir / "vm.log").read_text()[-2000:]
    return answer


def check(fingerprint: Path, device: str) -> tuple[str, dict[str, Any]]:
    """``vfiocapsctl migration check FILE --device ID --json``: the verdict by exit status."""
    result = subprocess.run(
        [vfiocapsctl(), "migration", "check", str(fingerprint), "--device", device, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode in CHECK_EXIT, result
    answer = json.loads(result.stdout)
    assert answer["verdict"] == CHECK_EXIT[result.returncode], answer
    return answer["verdict"], answer


def check_on_the_bus(daemon: Daemon, fingerprint: str, device: str) -> tuple[str, list[Any]]:
    """Manager.CheckMigration(fingerprint, device): the verdict and the (field, verdict, detail)
    rows."""
    verdict, reasons = daemon.call(ROOT_PATH, MANAGER, "CheckMigration", "ss", fingerprint, device)
    return str(verdict), [list(row) for row in reasons]


def test_mtty_2_state_into_mtty_1(daemon: Daemon, samples: dict[str, str], tmp_path: Path) -> None:
    source, destination = samples["mtty-2"], samples["mtty-1"]
    for mdev_uuid in (source, destination):
        daemon.wait_settled(mdev_uuid)
    stream = save_state(source, tmp_path)
    size = stream.stat().st_size
    into_other_type = load_state(destination, stream, tmp_path / "mtty-1")
    into_same_type = load_state(source, stream, tmp_path / "mtty-2")

    fingerprint = tmp_path / "mtty-2.json"
    made = subprocess.run(
        [vfiocapsctl(), "migration", "fingerprint", source, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    fingerprint.write_text(made.stdout)
    document = json.loads(made.stdout)
    published = daemon.wait_settled(source)
    assert document["type_id"] == "mtty-2", document
    assert document["migration_flags"] is not None, document
    assert sorted(document["migration_flags"]) == sorted(published["MigrationFlags"]), document
    assert document["migration_with_options"] == published["MigrationWithOptions"], document
    other_verdict, other_answer = check(fingerprint, destination)
    same_verdict, same_answer = check(fingerprint, source)
    for device, verdict, answer in (
        (destination, other_verdict, other_answer),
        (source, same_verdict, same_answer),
    ):
        on_bus, rows = check_on_the_bus(daemon, made.stdout, device)
        assert on_bus == verdict, (on_bus, rows, answer)
        listed = [[row["field"], row["verdict"], row["detail"]] for row in answer["reasons"]]
        assert rows == listed, (rows, listed)
    flags_row = [row for row in same_answer["reasons"] if row["field"] == "migration_flags"]
    assert flags_row, same_answer
    assert flags_row[0]["verdict"] == "compatible", same_answer
    assert flags_row[0]["detail"].startswith("both "), flags_row  # compared, not skipped

    results = os.environ.get("VFIOCAPS_LAB_RESULTS")
    if results:
        (Path(results) / "migration-compat.json").write_text(
            json.dumps(
                {
                    "stream_bytes": size,
                    "mtty-2 into mtty-1": into_other_type,
                    "mtty-2 into mtty-2": into_same_type,
                    "check mtty-2 -> mtty-1": other_answer,
                    "check mtty-2 -> mtty-2": same_answer,
                },
                indent=2,
            )
        )
    assert into_same_type["status"] == "completed", into_same_type
    assert same_verdict != INCOMPATIBLE, same_answer
    if into_other_type["status"] == "completed":
        assert other_verdict != INCOMPATIBLE, (into_other_type, other_answer)
    else:
        assert other_verdict == INCOMPATIBLE, (into_other_type, other_answer)
        failed = {row["field"] for row in other_answer["reasons"] if row["verdict"] == INCOMPATIBLE}
        assert "type_id" in failed, other_answer
