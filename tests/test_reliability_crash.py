"""The daemon killed (SIGKILL) at random points while it writes, fifty times in a row.

Each round starts vfiocapsd on the same cache, makes it write (devices come and go, probes
finish, a refresh replaces a record) and kills it after a random delay. After every kill the
database must open and pass SQLite's integrity check with no half-written row; at the end a
restarted daemon serves every device, and no granted node or QEMU is left behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import time

import pytest

from support.daemon_lab import Lab, manager_property
from support.harness import BUS_NAME, ROOT_PATH, wait_until
from support.reliability import daemon_pid, qemu_pids

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

ROUNDS = 50
TYPES = [("mtty", "mtty-1"), ("mtty", "mtty-2"), ("mdpy", "mdpy-hd"), ("mbochs", "mbochs-small")]
DISPLAYS = {"none", "region", "dmabuf"}
MIGRATIONS = {"supported", "unsupported", "unknown"}


def check_database(path: os.PathLike[str]) -> tuple[int, int]:
    """Integrity and whole rows; returns (capability records, history rows). A daemon killed
    between creating the file and its first migration's commit leaves a database of schema 0
    with no table at all: whole, and migrated at the next start."""
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        if db.execute("PRAGMA user_version").fetchone() == (0,):
            tables = db.execute("SELECT name FROM sqlite_master").fetchall()
            assert tables == [], f"schema 0 with tables: {tables}"
            return 0, 0
        rows = db.execute(
            "SELECT driver, type_id, outcome, error, probed_at_us, retry_at_us, document "
            "FROM capabilities"
        ).fetchall()
        for driver, type_id, outcome, error, at, retry, document in rows:
            assert all((driver, type_id, at > 0)), rows
            if outcome == "ok":
                # A whole answer: its document parses and holds what every answer has.
                answer = json.loads(document)
                assert isinstance(answer["migration_blockers"], list), rows
                assert isinstance(answer["migration_notes"], list), rows
                assert answer["display"] in DISPLAYS, rows
                assert answer["migration"] in MIGRATIONS, rows
            else:
                assert (bool(error), retry > at, document) == (True, True, None), rows
        for row in db.execute("SELECT device_id, kind, sysfs_path FROM known_devices"):
            assert all(row), row
        history = db.execute("SELECT count(*) FROM probe_history").fetchone()[0]
    return len(rows), history


@pytest.mark.slow
def test_fifty_kills_during_writes_leave_a_whole_database(lab: Lab) -> None:
    rng = random.Random(20261124)
    lab.host.build("samples")
    database = lab.directory / "cache" / "capabilities.sqlite"
    live: list[str] = [lab.host.add_instance(*TYPES[0])]
    kills_while_probing = 0
    # One runtime directory for every round, as under systemd: the journal of granted nodes.
    shared_runtime = ("--runtime-dir", str(lab.directory / "run"))
    for round_number in range(ROUNDS):
        daemon = lab.start(
            *shared_runtime, "--probe-retry-seconds", "1", name=f"round-{round_number}"
        )
        pid = daemon_pid(daemon)
        module, type_id = TYPES[round_number % len(TYPES)]
        live.append(lab.host.add_instance(module, type_id))
        if len(live) > 6:
            lab.host.remove_instance(live.pop(1))
        if round_number % 5 == 4:
            subprocess.Popen(
                ["busctl", f"--address={lab.bus.address}", "call", BUS_NAME, ROOT_PATH,
                 "org.vfiocaps1.Manager", "Refresh", "s", live[-1]],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        time.sleep(rng.uniform(0.0, 0.3))
        kills_while_probing += bool(qemu_pids(lab))
        os.kill(pid, signal.SIGKILL)
        assert daemon.process is not None
        daemon.process.wait(10)
        if database.exists():
            check_database(database)
    wait_until(lambda: not qemu_pids(lab), 15, "orphaned probe QEMUs to exit")
    final = lab.start(*shared_runtime, name="final")
    lab.wait_states(dict.fromkeys(live, "done"), timeout=60)
    assert manager_property(lab.bus, "DeviceCount") == len(live)
    assert manager_property(lab.bus, "CacheState") == "ok"
    time.sleep(0.5)
    records, history = check_database(database)
    assert records == len(TYPES)
    for node in (lab.dev / "vfio").iterdir():
        st = node.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), node
    assert final.alive()
    print(
        f"{ROUNDS} SIGKILLs ({kills_while_probing} with a probe running), "
        f"{records} records and {history} history rows intact, {len(live)} devices served"
    )
