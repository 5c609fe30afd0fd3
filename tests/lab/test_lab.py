"""The real-kernel lab: a Debian trixie guest with the kernel's sample mdev drivers runs the
guest-side suite (tests/lab/guest) against the installed daemon; this test boots it and reports."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support.lab_host import RUNNER, skip_reason

# A cold build (about 3 minutes) plus boot, install and the guest suite under emulation (about
# 30 minutes on 2 cores with the VM-start races of the libvirt hook), with room for a busy host.
LAB_TIMEOUT = 3600

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(LAB_TIMEOUT + 120)]


def failures(junit: Path) -> list[str]:
    """`name: message` of every failed or erroring guest test."""
    found = []
    # The file comes from the lab's own guest over its results share.
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314
        for problem in (*case.findall("failure"), *case.findall("error")):
            message = (problem.get("message") or "").splitlines()
            found.append(f"{case.get('name')}: {message[0] if message else problem.tag}")
    return found


def test_guest_suite_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    results = tmp_path / "results"
    run = subprocess.run(
        [str(RUNNER), "--results", str(results), "--timeout", str(LAB_TIMEOUT - 300)],
        capture_output=True,
        text=True,
        timeout=LAB_TIMEOUT,
        check=False,
    )
    table = results / "capabilities.md"
    timings = results / "timings.json"
    with capsys.disabled():
        print(f"\nlab results: {results}")
        if table.exists():
            print(table.read_text())
        if timings.exists():
            print("lab timings:", json.loads(timings.read_text()))
    assert run.returncode != 2, f"the lab itself failed:\n{run.stderr[-6000:]}"
    junit = results / "junit.xml"
    assert junit.exists(), f"no junit.xml from the guest:\n{run.stderr[-6000:]}"
    failed = failures(junit)
    assert run.returncode == 0, "guest tests failed:\n" + "\n".join(failed)
    assert not failed
