"""The linters and the type checker are part of the test suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.harness import REPO

LINTERS = {
    "ruff-check": [sys.executable, "-m", "ruff", "check", "daemon", "tests", "bench"],
    "ruff-format": [sys.executable, "-m", "ruff", "format", "--check", "daemon", "tests", "bench"],
    "mypy-strict": [sys.executable, "-m", "mypy", "--strict"],
}


@pytest.mark.parametrize("name", sorted(LINTERS))
def test_linter_is_clean(name: str) -> None:
    result = subprocess.run(LINTERS[name], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
