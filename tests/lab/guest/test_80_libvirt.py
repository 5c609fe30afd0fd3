"""libvirt judges the daemon's answers: for every sample type the lab creates, the domain built from
the daemon's DomainXmlParts validates (and so does the one-text DomainXml, which carries the same
elements), starts with the proposed display (a display that needs OpenGL is refused on a host
without a render node), a region display gives a screenshot, and migration goes as reported."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from labkit import SAMPLE_TYPES, Daemon
from libvirtkit import (
    DOMAIN_PREFIX,
    DomainParts,
    Libvirt,
    domain,
    parse_parts,
    parts_from_named,
    serialised,
)

TYPE_IDS = [type_id for type_ids in SAMPLE_TYPES.values() for type_id in type_ids]
WORKDIR = Path("/var/tmp/vfiocaps-lab-libvirt")


@dataclass
class Case:
    """One sample type, the daemon's answer for its instance and the domain built from it."""

    type_id: str
    uuid: str
    props: dict[str, Any]
    parts: DomainParts
    name: str
    xml_file: Path
    one_text_file: Path
    one_text: DomainParts
    started: bool = False

    def gl_refused(self) -> bool:
        """The display needs OpenGL and the daemon found no way to give it on this host."""
        return bool(self.props["GlRequired"]) and self.props["GlHost"] != "set-up"

    def expected_migration(self) -> str:
        """What the daemon says of migration for the configuration its XML describes.

        XML that overrides the device's options describes the configuration with them, so the
        answer with options applies; plain XML starts the device with QEMU's defaults.
        """
        if self.parts.overrides:
            return str(self.props["MigrationWithOptions"])
        return str(self.props["Migration"])


@pytest.fixture(scope="module", params=TYPE_IDS)
def case(
    request: pytest.FixtureRequest, daemon: Daemon, samples: dict[str, str], libvirt: Libvirt
) -> Iterator[Case]:
    """The domain of one type (tests are grouped by type; its VM is gone before the next)."""
    type_id = request.param
    mdev_uuid = samples[type_id]
    props = daemon.wait_settled(mdev_uuid)
    assert props["ProbeState"] == "done", props
    named = dict(daemon.manager("DomainXmlParts", "ss", mdev_uuid, "remote"))
    parts = parts_from_named(named)
    assert parts.hostdevs, f"no <hostdev> in DomainXmlParts: {named}"
    one_text = parse_parts(daemon.manager("DomainXml", "s", mdev_uuid))
    name = f"{DOMAIN_PREFIX}{type_id}"
    WORKDIR.mkdir(parents=True, exist_ok=True)
    xml_file = WORKDIR / f"{name}.xml"
    xml_file.write_text(domain(name, parts))
    one_text_file = WORKDIR / f"{name}-one-text.xml"
    one_text_file.write_text(domain(name, one_text))
    found = Case(type_id, mdev_uuid, props, parts, name, xml_file, one_text_file, one_text)
    try:
        yield found
    finally:
        libvirt.remove(name)


def test_domain_validates(case: Case, libvirt: Libvirt) -> None:
    aliases, overridden = case.parts.hostdev_aliases(), case.parts.overridden_aliases()
    assert set(overridden) <= set(aliases), f"overrides {overridden} name no hostdev {aliases}"
    if case.props["MigrationOptions"]:
        assert overridden, "the device needs options, but no qemu-override carries them"
    outcome = libvirt.run(
        "virt-xml-validate", str(case.xml_file), "domain", check=f"{case.type_id}: validate"
    )
    assert outcome.ok, f"{outcome.output}\n{case.xml_file.read_text()}"


def test_one_text_answer_validates_with_the_same_elements(case: Case, libvirt: Libvirt) -> None:
    assert serialised(case.one_text) == serialised(case.parts)
    outcome = libvirt.run(
        "virt-xml-validate",
        str(case.one_text_file),
        "domain",
        check=f"{case.type_id}: validate DomainXml",
    )
    assert outcome.ok, f"{outcome.output}\n{case.one_text_file.read_text()}"


def test_domain_starts_as_proposed(case: Case, libvirt: Libvirt) -> None:
    defined = libvirt.virsh("define", str(case.xml_file), check=f"{case.type_id}: define")
    assert defined.ok, f"{defined.output}\n{case.xml_file.read_text()}"
    started = libvirt.virsh("start", case.name, check=f"{case.type_id}: start")
    case.started = started.ok
    if case.gl_refused():
        assert not started.ok, "a display that needs OpenGL started on a host without it"
        said = started.message().lower()
        assert any(word in said for word in ("render node", "opengl", "egl", "/dev/dri")), said
    else:
        assert started.ok, f"{started.output}\n{case.xml_file.read_text()}"
        assert libvirt.state(case.name) == "running"


def test_region_display_gives_a_screenshot(case: Case, libvirt: Libvirt) -> None:
    if case.props["Display"] != "region":
        pytest.skip(f"display {case.props['Display']}: only a region display gives an image here")
    assert case.started, "the domain did not start"
    image = WORKDIR / f"{case.name}.screen"
    image.unlink(missing_ok=True)
    shot = libvirt.virsh("screenshot", case.name, str(image), check=f"{case.type_id}: screenshot")
    assert shot.ok, shot.output
    header = image.read_bytes()[:8]
    assert header.startswith((b"P6", b"\x89PNG")), header
    assert image.stat().st_size > 1000


def test_migration_as_reported(case: Case, libvirt: Libvirt) -> None:
    if not case.started:
        pytest.skip("the domain is refused as reported (no OpenGL); libvirt cannot save it")
    expected = case.expected_migration()
    saved = WORKDIR / f"{case.name}.save"
    saved.unlink(missing_ok=True)
    save = libvirt.virsh("save", case.name, str(saved), check=f"{case.type_id}: save ({expected})")
    if expected == "supported":
        assert save.ok, f"reported migratable, but libvirt: {save.message()}"
        restore = libvirt.virsh("restore", str(saved), check=f"{case.type_id}: restore")
        assert restore.ok, f"reported migratable, saved, but libvirt: {restore.message()}"
        assert libvirt.state(case.name) == "running"
    elif expected == "unsupported":
        assert not save.ok, "reported not migratable, but libvirt saved it"
        assert libvirt.state(case.name) == "running", "a refused save must leave the VM running"
    else:
        pytest.fail(f"the daemon says migration is {expected!r}: nothing to judge")
    saved.unlink(missing_ok=True)
