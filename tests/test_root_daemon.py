"""The root daemon's own safety at start: its directories, grants left by a killed daemon, and a
second daemon that must not probe, each with the real vfiocapsd on a umockdev host."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from support.daemon_lab import Lab
from support.harness import wait_until
from support.prober import node_state
from support.reliability import daemon_pid, qemu_pids

pytestmark = [
    pytest.mark.skipif(shutil.which("umockdev-wrapper") is None, reason="umockdev is missing"),
    pytest.mark.skipif(os.geteuid() != 0, reason="lending device nodes needs root"),
]

HELD = "44444444-5555-4666-8777-000000000001"
NOBODY = 65534


def lent_nodes(lab: Lab) -> list[Path]:
    uid = pwd.getpwnam("vfiocaps-probe").pw_uid
    return [node for node in sorted((lab.dev / "vfio").iterdir()) if node.stat().st_uid == uid]


def test_nodes_a_killed_daemon_left_lent_go_back_at_start_before_any_probe(lab: Lab) -> None:
    lab.host.build("mtty")
    lab.overrides({"devices": {HELD: {"fault": {"on": "query-migrate", "pause_seconds": 60}}}})
    daemon = lab.start()
    lab.host.add_instance("mtty", "mtty-1", uuid=HELD)
    wait_until(lambda: lent_nodes(lab), 20, "the group node lent to the probe")
    lent = lent_nodes(lab)
    os.kill(daemon_pid(daemon), signal.SIGKILL)
    daemon.stop()
    for pid in qemu_pids(lab):
        os.kill(pid, signal.SIGKILL)
    assert lent_nodes(lab) == lent  # the killed daemon left it lent
    assert list(daemon.runtime_dir.glob("probe-*")) != []  # and its probe's directory
    lab.host.remove_instance(HELD)  # nothing to probe any more: no probe will come
    again = lab.start()
    assert lent_nodes(lab) == []
    assert all(node_state(node) == (0, 0, 0o600) for node in lent)
    assert "left granted by pid" in again.log()
    assert list(again.runtime_dir.glob("probe-*")) == []


def test_a_second_daemon_never_lends_a_node(lab: Lab) -> None:
    lab.host.build("mtty")
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.start()
    lab.wait_states({uuid: "done"})
    changes = {node: node.stat().st_ctime_ns for node in (lab.dev / "vfio").iterdir()}
    # With a cache of its own the second daemon has every device to probe.
    second = lab.daemon("--cache-dir", str(lab.directory / "cache-2"), name="second")
    second.start(wait=False)
    assert second.process is not None
    assert second.process.wait(30) == 1
    assert "already owned" in second.log()
    # A lent node is chowned twice: its inode change time moves.
    assert {node: node.stat().st_ctime_ns for node in changes} == changes
    assert "probe of" not in second.log()


def _planted_runtime_dir(lab: Lab, kind: str, victim: Path) -> Path:
    """A runtime directory an unprivileged user could have prepared, with a grant record."""
    runtime = lab.directory / f"run-{kind}"
    real = runtime if kind != "link" else lab.directory / "elsewhere"
    (real / "grants").mkdir(parents=True)
    record = {"node": str(victim), "uid": NOBODY, "gid": NOBODY, "mode": 0o666}
    (real / "grants" / "planted.json").write_text(json.dumps(record))
    if kind == "foreign":
        for path in (real, real / "grants", real / "grants" / "planted.json"):
            os.chown(path, NOBODY, NOBODY)
    elif kind == "writable":
        real.chmod(0o777)
    else:
        runtime.symlink_to(real)
    return runtime


@pytest.mark.parametrize("kind", ["foreign", "writable", "link"])
def test_an_unsafe_runtime_directory_is_refused_before_anything_is_read(
    lab: Lab, kind: str
) -> None:
    victim = lab.directory / "victim"
    victim.write_text("root only")
    victim.chmod(0o600)
    lab.host.build("mtty")
    lab.host.add_instance("mtty", "mtty-1")  # a probe would run at once
    runtime = _planted_runtime_dir(lab, kind, victim)
    daemon = lab.daemon("--runtime-dir", str(runtime), name=f"daemon-{kind}")
    lab.daemons.append(daemon)
    daemon.start(wait=False)
    assert daemon.process is not None
    wait_until(
        lambda: (
            daemon.process is not None
            and (daemon.process.poll() is not None or node_state(victim) != (0, 0, 0o600))
        ),
        30,
        "the daemon to exit (or to touch the victim)",
    )
    assert node_state(victim) == (0, 0, 0o600)
    assert daemon.process.wait(10) == 1
    assert f"refusing the runtime directory {runtime}" in daemon.log()
    assert "start again" in daemon.log()


def test_an_unsafe_cache_directory_is_refused(lab: Lab) -> None:
    cache = lab.directory / "shared-cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    daemon = lab.daemon("--cache-dir", str(cache), name="daemon-cache")
    lab.daemons.append(daemon)
    result = subprocess.run(
        daemon.command(), env=daemon.environment(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert f"refusing the cache directory {cache}" in result.stderr
