"""./scripts/run-daemon --demo: an emulated host that says so, and answers as the daemon does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from support.harness import REPO, wait_until


def test_the_demo_serves_an_emulated_host_and_says_so() -> None:
    venv = Path(sys.executable).parent.parent
    # The scratch directory must be one the probe user can enter: the default, /tmp.
    env = {key: value for key, value in os.environ.items() if key != "TMPDIR"}
    env["VFIOCAPS_VENV"] = str(venv)
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
        assert json.loads(ctl("xml", str(mdpy), "--json").stdout)["emulated"] is True
        assert ctl("xml", str(mdpy)).stdout.startswith("<!-- EMULATED HOST")
        printed = json.loads(ctl("migration", "fingerprint", str(mdpy), "--json").stdout)
        assert printed["emulated"] is True
        if os.geteuid() == 0:  # root needs no polkit for a refresh
            refreshed = ctl("refresh", str(mdpy), "--json")
            assert json.loads(refreshed.stdout)["Emulated"] is True, refreshed.stderr
            assert "emulated host" in ctl("refresh", str(mdpy)).stderr
        scratch = Path(address[1].removeprefix("unix:path=")).parent
        assert scratch.name.startswith("vfiocaps-demo-")
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # as Ctrl-C in a terminal
        status_code = demo.wait(60)
    assert status_code == 0
    assert not scratch.exists()
    assert "Traceback" not in "".join(said)
