"""Who wrote a state record: owner locks that outlive nothing, and pids that may be reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from support.owners import owner_lock_holder
from vfiocaps.discovery.instances import InstanceLedger
from vfiocaps.statefile import OWNER_SUFFIX, OwnerLock, process_start

UUID = "0b0b0b0b-0000-4000-8000-0000000a11fe"


def test_a_writer_is_alive_while_it_holds_its_lock(tmp_path: Path) -> None:
    writer = owner_lock_holder(tmp_path)
    checker = OwnerLock(tmp_path)
    try:
        assert checker.alive(writer.pid)
    finally:
        writer.kill()
        writer.wait()
    assert not checker.alive(writer.pid)
    assert not (tmp_path / f"{writer.pid}{OWNER_SUFFIX}").exists()  # the stale file is gone


def test_a_reused_pid_does_not_keep_a_dead_writers_record(tmp_path: Path) -> None:
    """The writer died and another process got its pid: the unlocked owner file tells."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / f"{other.pid}{OWNER_SUFFIX}").write_text("")
        assert not OwnerLock(tmp_path).alive(other.pid)
    finally:
        other.kill()
        other.wait()


def test_without_an_owner_file_the_pid_is_asked(tmp_path: Path) -> None:
    """Records of an older version have no owner file: a running pid keeps them."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert OwnerLock(tmp_path).alive(other.pid)
    finally:
        other.kill()
        other.wait()
    assert not OwnerLock(tmp_path).alive(other.pid)  # reaped
    assert not OwnerLock(tmp_path).alive(0)


def test_holding_is_idempotent_and_only_this_process_file(tmp_path: Path) -> None:
    lock = OwnerLock(tmp_path)
    lock.hold()
    lock.hold()
    assert [p.name for p in tmp_path.iterdir()] == [f"{os.getpid()}{OWNER_SUFFIX}"]


def test_two_threads_take_the_lock_at_once(tmp_path: Path) -> None:
    """Two ledgers of one daemon record from two worker threads at the same moment: both hold
    the one owner lock of the process, neither fails."""
    for attempt in range(20):
        directory = tmp_path / str(attempt)
        directory.mkdir()
        barrier = threading.Barrier(4)
        failures: list[BaseException] = []

        def take(
            lock: OwnerLock, barrier: threading.Barrier, failures: list[BaseException]
        ) -> None:
            barrier.wait()
            try:
                lock.hold()
            except OSError as err:
                failures.append(err)

        locks = [OwnerLock(directory), OwnerLock(directory)]
        threads = [
            threading.Thread(target=take, args=(lock, barrier, failures))
            for lock in (*locks, *locks)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert [p.name for p in directory.iterdir()] == [f"{os.getpid()}{OWNER_SUFFIX}"]
        assert OwnerLock(directory).alive(os.getpid())


WRITER = """
import sys
from pathlib import Path
from vfiocaps.discovery.instances import InstanceLedger
boot = Path(sys.argv[1])
InstanceLedger(Path(sys.argv[2]), boot).record(sys.argv[3])
"""


def test_a_deleted_owner_file_and_a_reused_pid_do_not_keep_a_dead_writer_alive(
    tmp_path: Path,
) -> None:
    """A daemon recorded a temporary instance and died; its owner file was deleted and another
    process got its pid. The record names the writer's start time: the instance is removed."""
    boot = tmp_path / "boot_id"
    boot.write_text("3f2a9c1e-8d4b-4e6f-a1b2-c3d4e5f60718\n")
    ledger_dir = tmp_path / "run" / "temporary-instances"
    subprocess.run([sys.executable, "-c", WRITER, str(boot), str(ledger_dir), UUID], check=True)
    device = tmp_path / "sys" / "bus" / "mdev" / "devices" / UUID
    device.mkdir(parents=True)
    (device / "remove").write_text("")
    record = ledger_dir / UUID
    written = json.loads(record.read_text())
    for owner in ledger_dir.glob(f"*{OWNER_SUFFIX}"):
        owner.unlink()  # deleted (by hand, by a cleaner of /run)
    reuser = subprocess.Popen(["sleep", "60"])  # has the dead writer's pid now
    try:
        record.write_text(json.dumps({**written, "pid": reuser.pid}))
        removed = InstanceLedger(ledger_dir, boot).remove_leftovers(tmp_path / "sys")
        assert removed == [UUID]
        assert (device / "remove").read_text() == "1"
        assert not record.exists()
    finally:
        reuser.kill()
        reuser.wait()


def test_a_running_writer_whose_owner_file_was_deleted_stays_alive(tmp_path: Path) -> None:
    writer = owner_lock_holder(tmp_path)
    try:
        (tmp_path / f"{writer.pid}{OWNER_SUFFIX}").unlink()
        started = process_start(writer.pid)
        assert started is not None
        assert OwnerLock(tmp_path).alive(writer.pid, started)
        assert not OwnerLock(tmp_path).alive(writer.pid, str(int(started) + 1))
    finally:
        writer.kill()
        writer.wait()


def test_a_process_start_is_read_past_a_command_name_with_parentheses(tmp_path: Path) -> None:
    proc = tmp_path / "proc" / "42"
    proc.mkdir(parents=True)
    fields = " ".join(["S", *(str(n) for n in range(4, 22)), "987654", "0"])
    (proc / "stat").write_text(f"42 (a) b (c)) {fields}\n")
    assert process_start(42, tmp_path / "proc") == "987654"
    assert process_start(43, tmp_path / "proc") is None
