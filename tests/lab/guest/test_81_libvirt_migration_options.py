"""The daemon's override is what makes an mtty VM migrate under libvirt: the domain the daemon's
parts describe, less its qemu-override (QEMU's defaults, what a consumer ignoring the override
starts), cannot be saved, as Migration says; with the override it can (test_80)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import Daemon
from libvirtkit import DOMAIN_PREFIX, DomainParts, Libvirt, domain, parts_from_named

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
    for name in ("defaults",):
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


def test_daemon_xml_without_its_override_cannot_be_saved(
    daemon: Daemon, libvirt: Libvirt, mtty: str, workdir: Path
) -> None:
    props = daemon.wait_settled(mtty)
    assert (props["Migration"], props["MigrationWithOptions"]) == ("unsupported", "supported")
    parts = parts_from_named(dict(daemon.manager("DomainXmlParts", "ss", mtty, "remote")))
    assert parts.overrides, "the daemon gives no qemu-override for a device that needs options"
    plain = DomainParts(hostdevs=parts.hostdevs, graphics=parts.graphics, video=parts.video)
    name = started(libvirt, workdir, "defaults", plain)
    save = libvirt.virsh("save", name, str(workdir / "defaults.save"), check="defaults: save")
    assert not save.ok, "with QEMU's defaults libvirt saved an mtty VM"
    assert "not supported" in save.message().lower(), save.output
    assert libvirt.state(name) == "running", "a refused save must leave the VM running"
