"""polkit checks bounded in time and number, withdrawn when they end: the real daemon on a real
dbus-daemon, a polkit authority that never answers one user (tests/support/polkit_authority.py), and
callers running as other users."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.harness import REPO, DaemonFactory, PrivateBus, wait_until

pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="calls as other users need root and setpriv",
)

ADMIN = pwd.getpwnam("daemon").pw_uid  # polkit says yes to this user at once
PATIENT = 65534  # polkit never answers this user (an agent that never replies)
OPEN_TO_ALL = '<policy context="default"><allow user="*"/></policy>'
AUTHORITY = REPO / "tests" / "support" / "polkit_authority.py"


def as_user(uid: int, *command: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]


@pytest.fixture
def open_bus() -> Iterator[PrivateBus]:
    directory = Path(tempfile.mkdtemp(prefix="vfiocaps-polkit-"))
    directory.chmod(0o755)
    bus = PrivateBus(directory, extra_config=OPEN_TO_ALL).start()
    try:
        yield bus
    finally:
        bus.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def authority(open_bus: PrivateBus) -> Iterator[Path]:
    """The authority's event log."""
    events = open_bus.directory / "polkit-events"
    process = subprocess.Popen(
        [sys.executable, str(AUTHORITY), "serve", open_bus.address, str(ADMIN), str(events)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield events
    finally:
        process.terminate()
        process.wait(10)


def events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def invalidate(bus: PrivateBus, uid: int) -> subprocess.CompletedProcess[str]:
    command = [
        "busctl", f"--address={bus.address}", "--timeout=20", "call", "org.vfiocaps",
        "/org/vfiocaps", "org.vfiocaps1.Manager", "Invalidate", "s", "mtty",
    ]  # fmt: skip
    return subprocess.run(as_user(uid, *command), capture_output=True, text=True, timeout=60)


def flood(
    bus: PrivateBus, count: int, uid: int = PATIENT
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """A caller as *uid* (polkit never answers it) with *count* interactive checks; returns it
    (still connected) and what was answered within two seconds."""
    process = subprocess.Popen(
        as_user(uid, sys.executable, str(AUTHORITY), "flood", bus.address, str(count)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


def test_a_caller_whose_agent_never_answers_cannot_lock_out_administrators(
    open_bus: PrivateBus, authority: Path, start_daemon: DaemonFactory
) -> None:
    daemon = start_daemon(bus=open_bus)
    # Two connections of one user, 100 checks each (the bus lets one connection wait for 128).
    floods = [flood(open_bus, 100) for _ in range(2)]
    try:
        admin = invalidate(open_bus, ADMIN)
        assert admin.returncode == 0, admin.stderr
        assert admin.stdout.strip() == "u 0"
        busy = sum(answered.get("org.vfiocaps1.Error.Busy", 0) for _, answered in floods)
        assert busy >= 192, floods
        checks = [event for event in events(authority) if event["event"] == "check"]
        assert len({event["id"] for event in checks}) == len(checks)  # one id per check
        assert len([event for event in checks if event["uid"] == PATIENT]) <= 8
    finally:
        for patient, _ in floods:
            assert patient.stdin is not None
            patient.stdin.close()
            patient.wait(20)
    assert daemon.alive()


def test_users_filling_the_cap_of_all_lock_out_neither_root_nor_administrators(
    open_bus: PrivateBus, authority: Path, start_daemon: DaemonFactory
) -> None:
    """Eight users with eight stalled checks each fill the cap of all (64): root needs no
    polkit and is answered; an administrator still gets a check; a ninth user gets one."""
    daemon = start_daemon(bus=open_bus)
    # Accounts of the system (the bus refuses a uid without one): none is root or ADMIN.
    accounts = sorted({e.pw_uid for e in pwd.getpwall()} - {0, ADMIN, PATIENT})
    if len(accounts) < 9:
        pytest.skip("fewer than nine system accounts to call as")
    users, ninth = accounts[:8], accounts[8]
    floods = [flood(open_bus, 4, uid) for uid in users for _ in range(2)]
    try:
        wait_until(
            lambda: len([e for e in events(authority) if e["event"] == "check"]) == 64,
            30,
            "64 checks to reach polkit",
        )
        assert all(answered == {"waiting": 4} for _, answered in floods), floods
        root = invalidate(open_bus, 0)
        assert root.returncode == 0, root.stderr
        admin = invalidate(open_bus, ADMIN)
        assert admin.returncode == 0, admin.stderr
        again = invalidate(open_bus, ADMIN)  # authorised once: remembered as an administrator
        assert again.returncode == 0, again.stderr
        late, answered = flood(open_bus, 4, ninth)
        floods.append((late, answered))
        assert answered == {"waiting": 1, "org.vfiocaps1.Error.Busy": 3}, answered
        checks = [event for event in events(authority) if event["event"] == "check"]
        assert 0 not in {event["uid"] for event in checks}  # root was never asked about
        assert len([event for event in checks if event["uid"] == ADMIN]) == 2
    finally:
        for process, _ in floods:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(20)
    assert daemon.alive()


def test_checks_are_withdrawn_when_the_caller_leaves(
    open_bus: PrivateBus, authority: Path, start_daemon: DaemonFactory
) -> None:
    start_daemon(bus=open_bus)
    patient, _ = flood(open_bus, 3)
    wait_until(lambda: len(events(authority)) == 3, 10, "three checks to reach polkit")
    patient.kill()
    patient.wait(10)
    asked = {event["id"] for event in events(authority) if event["event"] == "check"}

    def withdrawn() -> set[str]:
        return {event["id"] for event in events(authority) if event["event"] == "cancel"}

    wait_until(lambda: withdrawn() == asked, 10, "every check to be cancelled")


def test_a_check_polkit_does_not_answer_ends_in_time_and_is_withdrawn(
    open_bus: PrivateBus, authority: Path, start_daemon: DaemonFactory
) -> None:
    start_daemon("--authorization-timeout", "2", bus=open_bus)
    result = invalidate(open_bus, PATIENT)
    assert result.returncode != 0
    assert "no answer within 2 s" in result.stderr, result.stderr
    [check] = [event for event in events(authority) if event["event"] == "check"]
    wait_until(
        lambda: [e["id"] for e in events(authority) if e["event"] == "cancel"] == [check["id"]],
        10,
        "the check to be cancelled",
    )
