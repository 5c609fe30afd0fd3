"""Shared pieces of the prober tests: probe user, scratch trees, emulated sysfs, the fake QEMU."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vfiocaps.capabilities import ProbeReport
from vfiocaps.config import DEFAULT_PROBE_USER, Config
from vfiocaps.prober import Prober, ProbeTarget

from .harness import REPO

FAKE_QEMU_DIR = REPO / "tests" / "fake_qemu"
FIXTURES = REPO / "tests" / "fixtures" / "qemu"
REAL_QEMU = shutil.which("qemu-system-x86_64")


def make_group_node(node: Path, mode: int = 0o600) -> None:
    """A stand-in for an IOMMU group node: a character device (of /dev/null's number) as root,
    since only character devices are ever lent; a plain file otherwise (nothing is lent then)."""
    node.parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.mknod(node, stat.S_IFCHR | mode, os.makedev(1, 3))
    else:
        node.write_text("")
    node.chmod(mode)


SYSUSERS = REPO / "systemd" / "vfiocaps.sysusers"


def ensure_probe_user() -> str:
    """As root, make sure the probe user exists, made as ``scripts/run-daemon`` and the package
    make it (``systemd-sysusers`` with the project's sysusers.d file: its uid and gid are
    usually equal); return its name."""
    if os.geteuid() != 0:
        return DEFAULT_PROBE_USER
    try:
        pwd.getpwnam(DEFAULT_PROBE_USER)
    except KeyError:
        subprocess.run(["systemd-sysusers", str(SYSUSERS)], check=True, capture_output=True)
    return DEFAULT_PROBE_USER


@pytest.fixture(scope="session")
def probe_user() -> str:
    return ensure_probe_user()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the probe user can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="vfiocaps-prober-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _relative_link(link: Path, target: Path) -> None:
    if not link.is_symlink():
        os.symlink(os.path.relpath(target, link.parent), link)


@dataclass(frozen=True)
class FakeHost:
    """An emulated sysfs and /dev tree for the fake QEMU to read."""

    root: Path

    @property
    def sysfs(self) -> Path:
        return self.root / "sys"

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    def add_mdev(
        self, uuid: str, type_id: str, driver: str, group: str, parent: str = "mtty"
    ) -> Path:
        """An mdev bound to *driver* on a virtual *parent* (module *parent*), laid out with
        relative links as sysfs has them, so that discovery's reader reads it."""
        parent_dir = self.sysfs / "devices" / "virtual" / parent / parent
        (parent_dir / "mdev_supported_types" / type_id).mkdir(parents=True, exist_ok=True)
        device = parent_dir / uuid
        device.mkdir(parents=True)
        (self.sysfs / "bus" / "mdev" / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        (self.sysfs / "bus" / "mdev" / "devices").mkdir(parents=True, exist_ok=True)
        (self.sysfs / "kernel" / "iommu_groups" / group).mkdir(parents=True, exist_ok=True)
        (self.sysfs / "class" / parent).mkdir(parents=True, exist_ok=True)
        module = self.sysfs / "module" / parent
        module.mkdir(parents=True, exist_ok=True)
        (module / "srcversion").write_text(f"{parent.upper()}0000000000000000\n")
        _relative_link(parent_dir / "subsystem", self.sysfs / "class" / parent)
        os.symlink(f"../mdev_supported_types/{type_id}", device / "mdev_type")
        _relative_link(device / "driver", self.sysfs / "bus" / "mdev" / "drivers" / driver)
        _relative_link(device / "iommu_group", self.sysfs / "kernel" / "iommu_groups" / group)
        _relative_link(device / "subsystem", self.sysfs / "bus" / "mdev")
        _relative_link(self.sysfs / "bus" / "mdev" / "devices" / uuid, device)
        make_group_node(self.dev / "vfio" / group)
        return device

    def link_kvm(self) -> None:
        """Make the host's /dev/kvm visible in this tree."""
        self.dev.mkdir(parents=True, exist_ok=True)
        os.symlink("/dev/kvm", self.dev / "kvm")


@pytest.fixture
def fake_host(scratch: Path) -> FakeHost:
    return FakeHost(scratch / "host")


def install_fake_qemu(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy the fake QEMU and its data into *directory* (plus overrides); return the binary."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "qemu-system-x86_64"
    shutil.copy2(FAKE_QEMU_DIR / "qemu-system-x86_64", binary)
    shutil.copy2(FAKE_QEMU_DIR / "behaviours.json", directory / "behaviours.json")
    if overrides is not None:
        (directory / "overrides.json").write_text(json.dumps(overrides))
    for path in directory.iterdir():
        path.chmod(0o755 if path == binary else 0o644)
    return binary


def make_readable(root: Path) -> None:
    """Let the probe user read and traverse everything under *root* (links left alone)."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink() or path.parent.name == "vfio":
            continue
        mode = path.stat().st_mode
        path.chmod(mode | (0o555 if path.is_dir() else 0o444))


def load_fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def leftovers(directory: Path) -> list[Path]:
    """Everything under a runtime *directory* but the grant journal's directory when empty
    (the journal's lock; it stays)."""
    if not directory.exists():
        return []
    journal = directory / "grants"
    return sorted(
        path
        for path in directory.rglob("*")
        if path != journal or not path.is_dir() or any(path.iterdir())
    )


def node_state(path: Path) -> tuple[int, int, int]:
    """A node's owner, group and permission bits (of the link itself, for a link)."""
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


VERSION_ASKED = "-version"
PROPERTIES_ASKED = "-nodefaults -machine none -device vfio-pci,help"


def counting_qemu(directory: Path) -> tuple[Path, Path]:
    """The fake QEMU in *directory* behind a script that appends each argv (one line) to a
    file anyone can write: (the binary, that file)."""
    fake = install_fake_qemu(directory / "fake")
    calls = directory / "calls"
    calls.write_text("")
    calls.chmod(0o666)
    binary = directory / "qemu" / "qemu-system-x86_64"
    binary.parent.mkdir(mode=0o755)
    binary.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {fake} "$@"\n')
    binary.chmod(0o755)
    return binary, calls


def fake_qemu_config(
    scratch: Path,
    host: FakeHost,
    user: str,
    overrides: dict[str, Any] | None = None,
    **settings: Any,
) -> Config:
    """A prober configuration for *host* with the fake QEMU (and *overrides*) installed in
    *scratch*, everything there made readable for the probe user."""
    qemu = install_fake_qemu(scratch / "qemu", overrides)
    make_readable(scratch)
    return Config(
        runtime_dir=scratch / "run",
        dev_root=host.dev,
        sysfs_root=host.sysfs,
        qemu_binary=qemu,
        probe_user=user,
        probe_timeout=20.0,
        **settings,
    )


async def probe_with_fake_qemu(
    scratch: Path,
    host: FakeHost,
    user: str,
    device: Path,
    overrides: dict[str, Any] | None = None,
    observer: Any = None,
    **settings: Any,
) -> ProbeReport:
    """Probe *device* of *host* with the real prober and the fake QEMU (with *overrides*);
    checks that the probe left nothing in its runtime directory."""
    config = fake_qemu_config(scratch, host, user, overrides, **settings)
    report = await Prober(config, observer=observer).probe(
        ProbeTarget.from_sysfs(device, host.sysfs)
    )
    assert leftovers(scratch / "run") == [], "the stream or the probe directory was left"
    return report
