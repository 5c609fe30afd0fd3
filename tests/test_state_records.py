"""Who wrote a state record: owner locks that outlive nothing, and pids that may be reused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.owners import owner_lock_holder
from vfiocaps.statefile import OWNER_SUFFIX, OwnerLock


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
