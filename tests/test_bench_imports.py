"""The benchmarks are not run by the tests, but they must keep up with the code they measure."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import support.harness
from support.harness import REPO

MODULES = sorted(path.stem for path in (REPO / "bench").glob("*.py") if path.stem != "__init__")
# The benchmark programs: the modules under bench/ and the lab's, run inside the guest.
PROGRAMS = sorted([*(REPO / "bench").glob("*.py"), REPO / "tests/lab/guest/bench_lab.py"])


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    assert Path(REPO / "bench" / f"{name}.py").is_file()
    importlib.import_module(f"bench.{name}")
    assert f"bench.{name}" in sys.modules


def test_the_rigs_are_one_copy_in_tests_and_benchmarks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``support`` under one name: a rig's classes are the same types in both."""
    monkeypatch.syspath_prepend(str(REPO))
    for name in MODULES:
        importlib.import_module(f"bench.{name}")
    assert not [name for name in sys.modules if name.startswith("tests.")]
    scale = sys.modules["bench.scale"]
    assert scale.DaemonProcess is support.harness.DaemonProcess


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.name)
def test_benchmarks_use_the_probers_public_api_and_import_rigs_as_support(path: Path) -> None:
    modules = _imported_modules(path)
    assert not [m for m in modules if m.startswith("vfiocaps.prober.")], (
        f"{path.name} reaches into the prober: import from vfiocaps.prober only"
    )
    assert not [m for m in modules if m == "tests" or m.startswith("tests.")], (
        f"{path.name} imports the rigs as tests.support: import support"
    )
