"""``scripts/run-tests`` itself, run as a developer runs it: pytest's arguments pass through, a
run that ran no test fails, and a run that leaves a file or a process behind fails and says what."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

from support.harness import REPO
from support.leftovers import files_under

LEAKY = """
import os, subprocess, tempfile

def test_that_leaves_a_file_and_a_process():
    with open(os.path.join(tempfile.gettempdir(), "forgotten"), "w") as forgotten:
        forgotten.write("left behind")
    subprocess.Popen(["sleep", "600"], start_new_session=True)
"""

TIDY = """
import os, subprocess, tempfile

def test_that_cleans_up():
    path = tempfile.mkdtemp()
    child = subprocess.Popen(["sleep", "600"], cwd=path)
    child.kill()
    child.wait()
    os.rmdir(path)
"""


def run_tests(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VFIOCAPS_TEST_TMPDIR": str(tmp), "VFIOCAPS_TEST_WORKERS": "1"}
    return subprocess.run(
        [str(REPO / "scripts" / "run-tests"), *args],
        capture_output=True, text=True, env=env, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip


def write_test(name: str, text: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="vfiocaps-run-tests-"))
    (directory / name).write_text(text)
    return directory / name


def test_a_run_that_leaves_a_file_and_a_process_fails_and_names_them(tmp_path: Path) -> None:
    leaky = write_test("test_leaky.py", LEAKY)
    try:
        result = run_tests(tmp_path, str(leaky), "-p", "no:cacheprovider", "-q")
    finally:
        leaky.unlink()
        leaky.parent.rmdir()
    left = re.findall(r"left behind: process (\d+)", result.stdout)
    for pid in {int(found) for found in left}:
        os.kill(pid, signal.SIGKILL)
    assert result.returncode != 0, result.stdout
    assert "1 passed" in result.stdout
    assert re.search(r"left behind: file \S+/forgotten$", result.stdout, re.M), result.stdout
    assert re.search(r"left behind: process \d+: sleep 600", result.stdout), result.stdout
    assert re.search(r"^leftovers +- +[\d.]+ +\d+ found$", result.stdout, re.M), result.stdout
    assert left, result.stdout


def test_a_tidy_run_passes_and_leaves_nothing(tmp_path: Path) -> None:
    tidy = write_test("test_tidy.py", TIDY)
    try:
        result = run_tests(tmp_path, str(tidy), "-p", "no:cacheprovider", "-q")
    finally:
        tidy.unlink()
        tidy.parent.rmdir()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^pytest +1 +[\d.]+ +passed$", result.stdout, re.M), result.stdout
    assert re.search(r"^leftovers +- +[\d.]+ +none$", result.stdout, re.M), result.stdout
    assert files_under(tmp_path) == []


def test_a_run_of_no_test_fails(tmp_path: Path) -> None:
    result = run_tests(tmp_path, "tests/test_ids.py", "-k", "no_test_has_this_name", "-q")
    assert result.returncode == 5, result.stdout
    assert "ran no test; that is a failure" in result.stdout
    assert files_under(tmp_path) == []
