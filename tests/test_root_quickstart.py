"""``scripts/run-daemon`` as root: its private bus and state live in a directory only root made,
and it never uses a directory or a bus somebody else prepared."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.harness import REPO, PrivateBus, busctl, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the quick start as root")

NOBODY = 65534


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfiocaps-quickstart-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_daemon(base: Path) -> subprocess.Popen[str]:
    """The script, told to use ``base/vfiocaps-quickstart`` (both ways it can be told)."""
    env = {
        "PATH": os.environ["PATH"],
        "VFIOCAPS_VENV": str(Path(sys.executable).parent.parent),
        "VFIOCAPS_QUICKSTART_DIR": str(base / "vfiocaps-quickstart"),
        "XDG_RUNTIME_DIR": str(base),
    }
    return subprocess.Popen(
        [str(REPO / "scripts" / "run-daemon")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def refused(process: subprocess.Popen[str]) -> str:
    """Its stderr, once it exited with 1 (a script still running after 20 s has failed)."""
    try:
        _, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=20)
        raise AssertionError("run-daemon went ahead") from None
    assert process.returncode == 1, err
    return err


def test_a_directory_another_user_made_is_refused(base: Path) -> None:
    victim = base / "victim"
    victim.write_text("root only")
    victim.chmod(0o600)
    planted = base / "vfiocaps-quickstart"
    (planted / "run" / "grants").mkdir(parents=True)
    record = {"node": str(victim), "uid": NOBODY, "gid": NOBODY, "mode": 0o666}
    (planted / "run" / "grants" / "planted.json").write_text(json.dumps(record))
    for path in (planted, *planted.rglob("*")):
        os.chown(path, NOBODY, NOBODY)
    planted.chmod(0o777)
    err = refused(run_daemon(base))
    assert f"refusing {planted}: it belongs to uid {NOBODY}" in err
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


def test_a_bus_it_did_not_start_is_never_used(base: Path) -> None:
    directory = base / "vfiocaps-quickstart"
    directory.mkdir(mode=0o700)
    bus = PrivateBus(directory).start()  # somebody's bus, answering on the script's socket
    try:
        err = refused(run_daemon(base))
        assert "a bus already answers" in err
        assert not bus.name_has_owner()
    finally:
        bus.stop()


def test_the_quick_start_serves_from_a_private_directory(base: Path) -> None:
    script = run_daemon(base)
    address = f"unix:path={base / 'vfiocaps-quickstart' / 'bus'}"
    try:
        assert script.stderr is not None
        lines = []
        while not any("query it with" in line for line in lines):
            line = script.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        directory = base / "vfiocaps-quickstart"
        st = directory.lstat()
        assert stat.S_ISDIR(st.st_mode)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        wait_until(
            lambda: busctl(address, "status", "org.vfiocaps", check=False).returncode == 0,
            30,
            "vfiocapsd on the quick start's bus",
        )
    finally:
        script.send_signal(signal.SIGTERM)
        script.communicate(timeout=30)
    # the daemon and then the bus went with the script
    assert busctl(address, "status", check=False).returncode != 0
