"""The layering rules of docs/architecture.md: which part of the daemon may import which, and
how large a module or a class may grow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "vfiocaps"

# The ground floor: small modules every layer may use. They import nothing of the project but
# each other.
FOUNDATION = frozenset(
    {
        "errors",
        "ids",
        "model",
        "bootid",
        "statefile",
        "capabilities",
        "capschema",
        "fieldspec",
        "drm",
        "vfiogroup",
        "journal",
        "memory",
        "hardening",
        "directories",
        "config",
        "process",
        "forked",
        "qemubinary",
        "hostpaths",
        "tasks",
        "ledger",
        "runstate",
        "cmdline",
    }
)
# Pure renderings of an answer: no I/O of the daemon's, usable by the daemon and by vfiocapsctl.
RENDERINGS = frozenset({"domainxml", "fingerprint", "explain"})

# What each part may import besides itself, the foundation and the renderings.
ALLOWED: dict[str, frozenset[str]] = {
    "store": frozenset(),
    "discovery": frozenset(),
    "prober": frozenset({"discovery"}),
    "engine": frozenset({"discovery", "store"}),
    # Outputs follow the engine's views; they never reach into discovery, the prober or the bus.
    "nfdlabels": frozenset({"engine", "nfdfile"}),
    # The NFD feature file on disk, in a directory another program owns: no knowledge of labels.
    "nfdfile": frozenset(),
    "notify": frozenset({"engine"}),
    # The outputs besides the bus, built from the configuration in one place.
    "outputs": frozenset({"engine", "nfdfile", "nfdlabels", "notify"}),
    # The bus adaptor translates: the engine's API in, D-Bus out.
    "bus": frozenset({"engine"}),
    # Composition: the only places that know every part.
    "app": frozenset({"bus", "discovery", "engine", "outputs", "prober", "store"}),
    "daemon": frozenset({"app", "nfdlabels"}),
    # The client side knows the bus's names and errors, never the engine or the daemon.
    "client": frozenset({"bus"}),
    "ctl": frozenset({"bus", "client", "prober"}),
}
# Within the bus, the client may use only these modules (the tables of names and errors, and the
# bus address rule).
CLIENT_BUS_MODULES = frozenset({"bus.names", "bus.errors", "bus.calls", "bus.validation"})


def part_of(module: str) -> str:
    """The part a dotted name below vfiocaps (`bus.names`, `errors`) belongs to."""
    return module.split(".")[0]


def project_imports(path: Path) -> set[str]:
    """The vfiocaps modules `path` imports, as dotted names without the leading `vfiocaps.`."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    package = list(relative.parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.append(".".join(["vfiocaps", *base, *([node.module] if node.module else [])]))
            elif node.module:
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        for name in names:
            if name == "vfiocaps" or name.startswith("vfiocaps."):
                found.add(name.removeprefix("vfiocaps").removeprefix("."))
    found.discard("")
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_what_its_layer_allows(path: Path) -> None:
    relative = path.relative_to(PACKAGE)
    own = relative.parts[0].removesuffix(".py")
    if own == "__init__":
        return
    if own in FOUNDATION:
        allowed = FOUNDATION
    elif own in RENDERINGS:
        allowed = FOUNDATION | RENDERINGS
    else:
        assert own in ALLOWED, f"{relative}: a new part; give it a place in docs/architecture.md"
        allowed = FOUNDATION | RENDERINGS | ALLOWED[own] | {own}
    wrong = sorted(name for name in project_imports(path) if part_of(name) not in allowed)
    assert not wrong, f"{relative} ({own}) may not import {', '.join(wrong)}"
    if own == "client":
        bus = {name for name in project_imports(path) if part_of(name) == "bus"}
        assert bus <= CLIENT_BUS_MODULES, f"{relative} reaches into the bus adaptor: {bus}"


def test_the_rules_name_only_parts_that_exist() -> None:
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.name != "__init__.py"}
    parts.discard("__pycache__")
    parts.discard("py.typed")
    named = set(ALLOWED) | RENDERINGS
    assert named <= parts, f"rules for parts that do not exist: {sorted(named - parts)}"
    unplaced = parts - named - FOUNDATION
    assert not unplaced, f"parts with no layer: {sorted(unplaced)}"


MODULE_LINES = 450  # no module of the daemon past this
CLASS_LINES = 350  # no class past this


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.stem)
def test_no_module_or_class_is_past_its_size(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MODULE_LINES, f"{path.name}: split it (docs/architecture.md)"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
            size = node.end_lineno - node.lineno + 1
            assert size <= CLASS_LINES, f"{path.name}: class {node.name} is {size} lines"
