"""Calling the daemon as other users: busctl calls, a bus open to every user, a mock polkitd.

The fixtures are registered for every test module by ``conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import BUS_NAME, ROOT_PATH, PrivateBus, wait_until

MANAGER = "org.vfiocaps1.Manager"
OPEN_TO_ALL = '<policy context="default"><allow user="*"/></policy>'


def call(
    address: str, method: str, signature: str = "", *args: str, as_user: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = ["busctl", f"--address={address}", "call", BUS_NAME, ROOT_PATH, MANAGER, method]
    if signature:
        command += [signature, *args]
    if as_user is not None:
        drop = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups"]
        command = [*drop, *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def shared_bus() -> Iterator[PrivateBus]:
    """A private bus every local user may connect to (for unprivileged callers)."""
    directory = Path(tempfile.mkdtemp(prefix="vfiocaps-bus-"))
    directory.chmod(0o755)
    bus = PrivateBus(directory, extra_config=OPEN_TO_ALL).start()
    try:
        yield bus
    finally:
        bus.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def polkitd(shared_bus: PrivateBus) -> Iterator[subprocess.Popen[bytes]]:
    """python-dbusmock's polkitd template on the shared bus (it rejects everything at first)."""
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=shared_bus.address)
    process = subprocess.Popen(
        [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: shared_bus.name_has_owner("org.freedesktop.PolicyKit1"), 60, "mock polkitd"
        )
        yield process
    finally:
        process.terminate()
        process.wait(10)
