"""./scripts/run-daemon --demo: an emulated host that says so, answers as the daemon does, and
leaves nothing behind, however it is stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.harness import REPO, wait_until
from support.leftovers import files_under, processes_naming


@pytest.fixture
def own_tmp() -> Iterator[Path]:
    """A temporary directory for the demo alone (its TMPDIR), which the probe user can enter:
    whatever the demo leaves behind is found there."""
    path = Path(tempfile.mkdtemp(prefix="vfiocaps-demo-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def demo_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VFIOCAPS_VENV"] = str(Path(sys.executable).parent.parent)
    env["TMPDIR"] = str(tmp)
    return env


def test_the_demo_serves_an_emulated_host_and_says_so(own_tmp: Path) -> None:
    env = demo_env(own_tmp)
    demo = subprocess.Popen(
        [str(REPO / "scripts" / "run-daemon"), "--demo"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    said: list[str] = []

    def read() -> None:
        assert demo.stderr is not None
        said.extend(iter(demo.stderr.readline, ""))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: any("--bus-address=" in line for line in said), 60, "the address", interval=0.2
        )
        address = re.search(r"--bus-address=(\S+)", "".join(said))
        assert address is not None
        assert "EMULATED host" in "".join(said)

        def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "vfiocaps.ctl", f"--bus-address={address[1]}", *args],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        def devices() -> list[dict[str, object]]:
            listed = ctl("list", "--json")
            return json.loads(listed.stdout) if listed.returncode == 0 else []

        wait_until(
            lambda: len(devices()) == 6 and all(d["ProbeState"] == "done" for d in devices()),
            120,
            "every emulated device probed",
            interval=1,
        )
        status = json.loads(ctl("status", "--json").stdout)
        assert status["Emulated"] is True
        answers = {d["TypeId"]: (d["Display"], d["Migration"]) for d in devices()}
        assert answers["mdpy-xga"] == ("region", "unsupported")
        assert answers["mbochs-small"][0] == "dmabuf"
        assert answers["nvidia-592"] == ("none", "supported")
        assert "emulated host" in ctl("list").stderr
        mdpy = next(d["Id"] for d in devices() if d["TypeId"] == "mdpy-xga")
        shown = ctl("show", str(mdpy)).stdout
        assert shown.startswith("EMULATED HOST")
        assert "<hostdev mode='subsystem' type='mdev'" in shown
        # Every machine-readable output says so too, and so does the XML one pastes.
        assert all(d["Emulated"] is True for d in json.loads(ctl("list", "--json").stdout))
        assert all(t["Emulated"] is True for t in json.loads(ctl("types", "--json").stdout))
        assert json.loads(ctl("show", str(mdpy), "--json").stdout)["Emulated"] is True
        assert json.loads(ctl("xml", str(mdpy), "--json").stdout)["Emulated"] is True
        assert ctl("xml", str(mdpy)).stdout.startswith("<!-- EMULATED HOST")
        printed = json.loads(ctl("migration", "fingerprint", str(mdpy), "--json").stdout)
        assert printed["emulated"] is True
        if os.geteuid() == 0:  # root needs no polkit for a refresh
            refreshed = ctl("refresh", str(mdpy), "--json")
            assert json.loads(refreshed.stdout)["Emulated"] is True, refreshed.stderr
            assert "emulated host" in ctl("refresh", str(mdpy)).stderr
        scratch = Path(address[1].removeprefix("unix:path=")).parent
        assert scratch.name.startswith("vfiocaps-demo-")
        assert scratch.parent == own_tmp
        # The labels of the emulated host are in the scratch directory, said so, and nowhere else.
        labels = scratch / "nfd" / "vfiocaps"
        wait_until(labels.exists, 60, "the NFD feature file", interval=0.2)
        assert "vfiocaps.feature.node.kubernetes.io/" in labels.read_text()
        assert str(labels) in "".join(said)
        assert any(own_tmp.glob("umockdev.*")), "the test bed is not where this test looks"
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # as Ctrl-C in a terminal
        status_code = demo.wait(60)
    assert status_code == 0
    assert "Traceback" not in "".join(said)
    # Nothing is left: no file (scratch, test bed, labels), no process.
    assert files_under(own_tmp) == []
    wait_until(lambda: not processes_naming(own_tmp), 30, "the demo's processes to go")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_demo_stopped_while_it_starts_leaves_nothing(own_tmp: Path, signum: int) -> None:
    demo = subprocess.Popen(
        [str(REPO / "scripts" / "run-daemon"), "--demo"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=demo_env(own_tmp),
    )
    # Stopped once its test bed exists, before its daemon answers.
    wait_until(lambda: any(own_tmp.glob("umockdev.*")), 60, "the demo's test bed", interval=0.05)
    demo.send_signal(signum)
    err = demo.communicate(timeout=60)[1]
    assert demo.returncode != 0
    assert "Traceback" not in err
    assert files_under(own_tmp) == []
    wait_until(lambda: not processes_naming(own_tmp), 30, "the demo's processes to go")


def test_the_demo_refuses_to_write_labels_outside_its_scratch(own_tmp: Path) -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "run-daemon"), "--demo", "--nfd-labels"],
        capture_output=True, text=True, env=demo_env(own_tmp), timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--nfd-labels is not taken" in result.stderr
    assert files_under(own_tmp) == []
