"""The benchmarks are not run by the tests, but they must keep up with the code they measure."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from support.harness import REPO

MODULES = sorted(path.stem for path in (REPO / "bench").glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    assert Path(REPO / "bench" / f"{name}.py").is_file()
    importlib.import_module(f"bench.{name}")
    assert f"bench.{name}" in sys.modules
