"""The libvirt domain parts of every display kind and migration case, judged by libvirt's schema."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from support.libvirt_domain import minimal_domain, validate
from vfiocaps.capabilities import Capabilities, Display, GlHost, Migration
from vfiocaps.domainxml import QEMU_NAMESPACE, Viewer, domain_parts, find_render_node
from vfiocaps.errors import InvalidArgumentError
from vfiocaps.model import Device, DeviceKind

QEMU = "{" + QEMU_NAMESPACE + "}"
MDEV = Device(
    kind=DeviceKind.MDEV,
    device_id="6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01",
    sysfs_path="/sys/devices/virtual/mtty/mtty/6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01",
    parent="mtty",
    type_id="mtty-1",
)
PCI = Device(
    kind=DeviceKind.PCI,
    device_id="0000:65:00.4",
    sysfs_path="/sys/devices/pci0000:64/0000:64:00.0/0000:65:00.4",
    parent="0000:65:00.0",
    type_id="nvidia-558",
)
# What QEMU needs for a device without dirty page tracking of its own (both, as strings).
OPTIONS = (("x-device-dirty-page-tracking", "off"), ("enable-migration", "on"))
RENDER_NODE = Path("/dev/dri/renderD128")


def capabilities(display: Display, options: tuple[tuple[str, str], ...]) -> Capabilities:
    return Capabilities(
        display=display,
        gl_required=display is Display.DMABUF,
        migration=Migration.UNSUPPORTED if options else Migration.SUPPORTED,
        migration_blockers=("needs x-device-dirty-page-tracking=off",) if options else (),
        qemu_version="10.0.13",
        migration_options=options,
        migration_with_options=Migration.SUPPORTED if options else Migration.UNKNOWN,
    )


CASES = list(
    itertools.product(
        (MDEV, PCI),
        (Display.NONE, Display.REGION, Display.DMABUF),
        ((), OPTIONS),
        (Viewer.LOCAL, Viewer.REMOTE),
        (RENDER_NODE, None),
    )
)


def _case_id(case: tuple[object, ...]) -> str:
    device, display, options, viewer, node = case
    assert isinstance(device, Device)
    assert isinstance(display, Display)
    assert isinstance(viewer, Viewer)
    return "-".join(
        (
            device.kind.value,
            display.value,
            "options" if options else "defaults",
            viewer.value,
            "node" if node else "no-node",
        )
    )


@pytest.mark.parametrize(
    ("device", "display", "options", "viewer", "node"), CASES, ids=[_case_id(c) for c in CASES]
)
def test_every_part_validates_in_a_minimal_domain(
    tmp_path: Path,
    device: Device,
    display: Display,
    options: tuple[tuple[str, str], ...],
    viewer: Viewer,
    node: Path | None,
) -> None:
    parts = domain_parts(device, capabilities(display, options), viewer, node).by_name()
    domain = minimal_domain(parts)
    result = validate(domain, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + domain
    assert result.stderr.rstrip().endswith(" validates")

    root = ET.fromstring(domain)  # noqa: S314 - XML this test generated
    (hostdev,) = root.iter("hostdev")
    graphics = [element.get("type") for element in root.iter("graphics")]
    videos = [model.get("type") for model in root.iter("model")]
    shown = device.kind is DeviceKind.MDEV and display is not Display.NONE
    if device.kind is DeviceKind.MDEV:
        assert hostdev.get("display") == ("on" if shown else "off")
        assert hostdev.get("ramfb") == ("on" if shown else None)
    else:
        assert hostdev.get("type") == "pci"
        assert hostdev.get("display") is None
    if not shown:
        assert graphics == []
        assert videos == []
    elif display is Display.REGION:
        assert graphics == ["vnc"]
        assert videos == ["none"]
    elif viewer is Viewer.LOCAL:
        assert graphics == ["spice"]
        assert videos == ["none"]
        (listen,) = root.iter("listen")
        assert listen.get("type") == "none"  # SPICE with OpenGL works on the host only
        (gl,) = root.iter("gl")
        assert gl.get("enable") == "yes"
    else:
        # QEMU 10 refuses VNC on a dma-buf console: egl-headless alone, and a note says so
        assert graphics == ["egl-headless"]
        assert videos == ["none"]
        assert "refuses VNC on a dma-buf console" in parts["notes"]
    for gl in root.iter("gl"):
        assert gl.get("rendernode") == (str(node) if node else None)
    if shown and display is Display.DMABUF and node is None:
        assert "render node" in parts["notes"]

    if options:
        alias = hostdev.find("alias")
        assert alias is not None
        assert alias.get("name", "").startswith("ua-")
        (override,) = root.iter(QEMU + "device")
        assert override.get("alias") == alias.get("name")
        found = [(p.get("name"), p.get("type"), p.get("value")) for p in override.iter()]
        assert found[2:] == [(name, "string", value) for name, value in options]
        assert parts["domain-namespace"] == f"xmlns:qemu='{QEMU_NAMESPACE}'"
        assert (
            "unsupported with QEMU's defaults, supported with the qemu-override" in parts["notes"]
        )
    else:
        assert hostdev.find("alias") is None
        assert "qemu-override" not in parts
        assert "domain-namespace" not in parts
    assert parts["notes"].splitlines()[-1].startswith("Migration: ")


def test_the_schema_refuses_what_libvirt_refuses(tmp_path: Path) -> None:
    """The validator judges: no "auto" display in libvirt; an override needs its namespace."""
    parts = domain_parts(MDEV, capabilities(Display.REGION, OPTIONS)).by_name()
    auto = dict(parts, hostdev=parts["hostdev"].replace("display='on'", "display='auto'"))
    assert validate(minimal_domain(auto), tmp_path / "auto").returncode != 0
    bare = {key: value for key, value in parts.items() if key != "domain-namespace"}
    assert validate(minimal_domain(bare), tmp_path / "bare").returncode != 0
    assert validate(minimal_domain(parts), tmp_path / "whole").returncode == 0


def test_values_are_escaped(tmp_path: Path) -> None:
    odd = (("x-odd", 'it\'s <on> & "off"'),)
    parts = domain_parts(MDEV, capabilities(Display.NONE, odd)).by_name()
    domain = minimal_domain(parts)
    assert validate(domain, tmp_path).returncode == 0
    (prop,) = ET.fromstring(domain).iter(QEMU + "property")  # noqa: S314 - generated here
    assert prop.get("value") == 'it\'s <on> & "off"'


def test_domain_xml_text_holds_every_part_and_notes_as_comments() -> None:
    parts = domain_parts(MDEV, capabilities(Display.DMABUF, OPTIONS), Viewer.REMOTE, None)
    text = parts.fragment()
    assert text.startswith("<hostdev mode='subsystem' type='mdev'")
    for part in (parts.hostdev, parts.graphics, parts.video, parts.qemu_override):
        assert part in text
    assert parts.domain_namespace in text
    comments = [line for line in text.splitlines() if line.startswith("<!--")]
    assert all("--" not in line[4:-3] for line in comments)
    assert any("Migration: unsupported" in line for line in comments)


def test_viewer_names() -> None:
    assert Viewer.parse("") is Viewer.REMOTE
    assert Viewer.parse("local") is Viewer.LOCAL
    with pytest.raises(InvalidArgumentError, match="'local' or 'remote'"):
        Viewer.parse("LOCAL ")


def test_render_node_is_found_under_the_dev_root(tmp_path: Path) -> None:
    assert find_render_node(tmp_path) is None
    (tmp_path / "dri").mkdir()
    (tmp_path / "dri" / "card0").touch()
    assert find_render_node(tmp_path) is None
    for name in ("renderD129", "renderD128", "renderD1000"):
        (tmp_path / "dri" / name).touch()
    assert find_render_node(tmp_path) == tmp_path / "dri" / "renderD128"


def test_the_render_node_a_probe_set_up_wins_over_the_hosts_first() -> None:
    proven = replace(
        capabilities(Display.DMABUF, ()),
        gl_host=GlHost.SET_UP,
        gl_render_node="/dev/dri/renderD129",
        gl_detail="GL display set up on /dev/dri/renderD129: ...",
    )
    for viewer in Viewer:
        parts = domain_parts(MDEV, proven, viewer, RENDER_NODE)
        assert "rendernode='/dev/dri/renderD129'" in parts.graphics
        assert "renderD128" not in parts.graphics
        assert any(
            note.startswith("OpenGL on this host: set-up: GL display set up on")
            for note in parts.notes
        )


@pytest.mark.parametrize("gl_host", [GlHost.CRASHED, GlHost.FAILED, GlHost.INACCESSIBLE])
def test_an_unproven_gl_answer_keeps_the_hosts_node_and_says_why(gl_host: GlHost) -> None:
    caps = replace(
        capabilities(Display.DMABUF, ()),
        gl_host=gl_host,
        gl_render_node="/dev/dri/renderD129",
        gl_detail="GL path crashed: QEMU ... was killed by SIGSEGV",
    )
    parts = domain_parts(MDEV, caps, Viewer.REMOTE, RENDER_NODE)
    assert "rendernode='/dev/dri/renderD128'" in parts.graphics
    assert f"OpenGL on this host: {gl_host.value}: GL path crashed" in parts.fragment()
