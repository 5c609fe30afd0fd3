"""libvirt migrates an mtty VM only with the device options set through its QEMU override
namespace: the lab writes both domains itself, so this holds whatever the daemon proposes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import Daemon
from libvirtkit import DOMAIN_PREFIX, DomainParts, Libvirt, domain, mdev_hostdev, override

ALIAS = "ua-vfiocaps-lab-mtty"
OPTIONS = {"x-device-dirty-page-tracking": "off", "enable-migration": "on"}
WORKDIR = Path("/var/tmp/vfiocaps-lab-libvirt")


@pytest.fixture
def mtty(daemon: Daemon, samples: dict[str, str]) -> str:
    """The mtty-1 instance, settled (no probe holds it)."""
    mdev_uuid = samples["mtty-1"]
    daemon.wait_settled(mdev_uuid)
    return mdev_uuid


@pytest.fixture
def workdir(libvirt: Libvirt) -> Iterator[Path]:
    WORKDIR.mkdir(parents=True, exist_ok=True)
    yield WORKDIR
    for name in ("options", "defaults"):
        libvirt.remove(f"{DOMAIN_PREFIX}{name}")
        (WORKDIR / f"{name}.save").unlink(missing_ok=True)


def started(libvirt: Libvirt, workdir: Path, name: str, parts: DomainParts) -> str:
    """Define and start a domain of *parts*; return its name."""
    full = f"{DOMAIN_PREFIX}{name}"
    xml_file = workdir / f"{full}.xml"
    xml_file.write_text(domain(full, parts))
    valid = libvirt.run("virt-xml-validate", str(xml_file), "domain", check=f"{name}: validate")
    assert valid.ok, f"{valid.output}\n{xml_file.read_text()}"
    assert libvirt.virsh("define", str(xml_file), check=f"{name}: define").ok
    start = libvirt.virsh("start", full, check=f"{name}: start")
    assert start.ok, f"{start.output}\n{xml_file.read_text()}"
    return full


def test_mtty_saves_and_restores_with_the_override_only(
    libvirt: Libvirt, mtty: str, workdir: Path
) -> None:
    with_options = DomainParts(
        hostdevs=[mdev_hostdev(mtty, alias=ALIAS)], overrides=[override(ALIAS, OPTIONS)]
    )
    name = started(libvirt, workdir, "options", with_options)
    saved = workdir / "options.save"
    save = libvirt.virsh("save", name, str(saved), check="options: save")
    assert save.ok, f"with {OPTIONS}: {save.message()}"
    restore = libvirt.virsh("restore", str(saved), check="options: restore")
    assert restore.ok, f"with {OPTIONS}: {restore.message()}"
    assert libvirt.state(name) == "running"
    libvirt.remove(name)

    name = started(libvirt, workdir, "defaults", DomainParts(hostdevs=[mdev_hostdev(mtty)]))
    save = libvirt.virsh("save", name, str(workdir / "defaults.save"), check="defaults: save")
    assert not save.ok, "with QEMU's defaults libvirt saved an mtty VM"
    assert "not supported" in save.message().lower(), save.output
    assert libvirt.state(name) == "running"
