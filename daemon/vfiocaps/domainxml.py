"""libvirt domain XML for a probed device: its ``<hostdev>`` and what libvirt needs beside it."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from .capabilities import Capabilities, Display, GlHost
from .drm import render_nodes
from .errors import InvalidArgumentError
from .model import Device, DeviceKind

# libvirt's namespace for QEMU-specific elements; <qemu:override> needs it declared on <domain>.
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"

# The names of the parts, as DomainXmlParts returns them.
PART_HOSTDEV = "hostdev"
PART_GRAPHICS = "graphics"
PART_VIDEO = "video"
PART_QEMU_OVERRIDE = "qemu-override"
PART_DOMAIN_NAMESPACE = "domain-namespace"
PART_NOTES = "notes"
PART_NAMES = (
    PART_HOSTDEV,
    PART_GRAPHICS,
    PART_VIDEO,
    PART_QEMU_OVERRIDE,
    PART_DOMAIN_NAMESPACE,
    PART_NOTES,
)

# libvirt keeps aliases that start with "ua-" (user aliases) and allows only these characters.
_ALIAS_PREFIX = "ua-vfiocaps-"
_NOT_IN_ALIAS = re.compile(r"[^A-Za-z0-9_.-]")


class Viewer(enum.Enum):
    """Where the person looking at the VM's display sits."""

    LOCAL = "local"  # on the host: SPICE with OpenGL over a local socket is possible
    REMOTE = "remote"  # elsewhere: VNC (a dma-buf display: egl-headless alone, no viewer)

    @classmethod
    def parse(cls, value: str) -> Viewer:
        """The viewer named *value*; an empty string means remote, which also works locally.

        Raises:
            InvalidArgumentError: *value* is neither ``local``, ``remote`` nor empty.
        """
        if value == "":
            return cls.REMOTE
        try:
            return cls(value)
        except ValueError as err:
            raise InvalidArgumentError(
                f"unknown viewer {value!r}: use 'local' or 'remote'"
            ) from err


@dataclass(frozen=True, slots=True)
class DomainParts:
    """The pieces of a libvirt domain that one device needs; empty strings for parts it lacks.

    ``hostdev``, ``graphics`` and ``video`` go into ``<devices>``; ``qemu_override`` is a child
    of ``<domain>`` and needs ``domain_namespace`` as an attribute of ``<domain>``.
    """

    hostdev: str
    graphics: str = ""
    video: str = ""
    qemu_override: str = ""
    notes: tuple[str, ...] = ()

    @property
    def domain_namespace(self) -> str:
        """The ``xmlns:qemu`` attribute ``<domain>`` must carry, when an override is present."""
        return f"xmlns:qemu={_attribute(QEMU_NAMESPACE)}" if self.qemu_override else ""

    def by_name(self) -> dict[str, str]:
        """The parts that are present, by their names (notes as lines of text)."""
        values = {
            PART_HOSTDEV: self.hostdev,
            PART_GRAPHICS: self.graphics,
            PART_VIDEO: self.video,
            PART_QEMU_OVERRIDE: self.qemu_override,
            PART_DOMAIN_NAMESPACE: self.domain_namespace,
            PART_NOTES: "\n".join(self.notes),
        }
        return {name: value for name, value in values.items() if value}

    @classmethod
    def from_names(cls, parts: dict[str, str]) -> DomainParts:
        """The parts as :meth:`by_name` gave them (the namespace follows from the override)."""
        return cls(
            hostdev=parts.get(PART_HOSTDEV, ""),
            graphics=parts.get(PART_GRAPHICS, ""),
            video=parts.get(PART_VIDEO, ""),
            qemu_override=parts.get(PART_QEMU_OVERRIDE, ""),
            notes=tuple(parts.get(PART_NOTES, "").splitlines()),
        )

    def fragment(self) -> str:
        """Every part in one text: the elements, each placement and note as an XML comment."""
        lines = [self.hostdev]
        if self.graphics or self.video:
            lines.append("<!-- Beside the hostdev in <devices>: -->")
            lines += [part for part in (self.graphics, self.video) if part]
        if self.qemu_override:
            lines.append(f"<!-- A child of <domain>, which needs {self.domain_namespace}: -->")
            lines.append(self.qemu_override)
        lines += [f"<!-- {_comment_text(note)} -->" for note in self.notes]
        return "\n".join(lines) + "\n"


# The ampersand first: the other entities bring their own.
XML_ENTITIES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&apos;"), ('"', "&quot;"))


def _attribute(value: str) -> str:
    """An XML attribute value in single quotes, as libvirt writes them. (Escaped here rather than
    with xml.sax.saxutils, which imports urllib, http and email into the daemon.)"""
    for char, entity in XML_ENTITIES:
        value = value.replace(char, entity)
    return f"'{value}'"


def _comment_text(text: str) -> str:
    """*text* made safe inside an XML comment (which may not contain ``--``)."""
    while "--" in text:
        text = text.replace("--", "- -")
    return text.rstrip("-")


def user_alias(device: Device) -> str:
    """The libvirt user alias the override names the device by (``ua-`` keeps libvirt's hands
    off it)."""
    return _ALIAS_PREFIX + _NOT_IN_ALIAS.sub("-", device.device_id.lower())


def find_render_node(dev_root: Path) -> Path | None:
    """The first DRM render node under *dev_root* (``dri/renderD128`` ...), or None."""
    nodes = render_nodes(dev_root)
    return nodes[0] if nodes else None


def domain_parts(
    device: Device,
    caps: Capabilities,
    viewer: Viewer = Viewer.REMOTE,
    render_node: Path | None = None,
) -> DomainParts:
    """The domain parts for *device* with probed capabilities *caps*.

    libvirt takes a mdev hostdev's ``display`` and ``ramfb`` only as on or off, and wants a
    ``<graphics>`` element whenever a display is on. A region display needs no OpenGL and is
    shown through VNC. A dma-buf display needs OpenGL: ``egl-headless`` (with *render_node*)
    alone for a remote viewer (QEMU 10 refuses VNC on a dma-buf console, so none comes with
    it), or SPICE with ``<gl>`` on a local socket for a local one (SPICE's OpenGL does not
    cross the network). ``<video><model type='none'/>`` keeps
    libvirt from adding an emulated card, so the device's display is the VM's only one.
    The render node a probe set the GL display up on wins over *render_node* (the host's
    first); the probe's GL answer goes into the notes.
    """
    notes: list[str] = []
    has_display = caps.display in (Display.REGION, Display.DMABUF)
    alias = user_alias(device) if caps.migration_options else ""
    graphics = video = ""
    if device.kind is DeviceKind.MDEV:
        hostdev = _mdev_hostdev(device, has_display, alias)
        if has_display:
            if caps.gl_host is GlHost.SET_UP and caps.gl_render_node:
                render_node = Path(caps.gl_render_node)
            graphics = _graphics(caps, viewer, render_node, notes)
            video = "<video>\n  <model type='none'/>\n</video>"
            notes.append(
                "ramfb='on' gives the display from boot; libvirt allows it on one hostdev per "
                "domain: set ramfb='off' on any other"
            )
    else:
        hostdev = _pci_hostdev(device, alias)
        if has_display:
            notes.append(
                f"the device has a {caps.display.value} display, but libvirt's PCI hostdev has "
                "no display setting: libvirt does not use it"
            )
    override = ""
    if caps.migration_options:
        override = _qemu_override(alias, caps.migration_options)
        names = ", ".join(f"{name}={value}" for name, value in caps.migration_options)
        notes.append(
            f"the device migrates only with {names} (the qemu-override part); libvirt marks "
            "such a domain tainted (custom-device)"
        )
    detail = "; ".join(caps.migration_blockers or caps.migration_notes)
    verdict = caps.migration.value
    if caps.migration_options:
        verdict += (
            f" with QEMU's defaults, {caps.migration_with_options.value} with the qemu-override"
        )
    notes.append(f"Migration: {verdict}{': ' + detail if detail else ''}")
    return DomainParts(hostdev, graphics, video, override, tuple(notes))


def _alias_line(alias: str) -> list[str]:
    return [f"  <alias name={_attribute(alias)}/>"] if alias else []


def _mdev_hostdev(device: Device, has_display: bool, alias: str) -> str:
    display = "on" if has_display else "off"
    ramfb = " ramfb='on'" if has_display else ""
    lines = [
        f"<hostdev mode='subsystem' type='mdev' model={_attribute(device.device_api)} "
        f"display='{display}'{ramfb}>",
        "  <source>",
        f"    <address uuid={_attribute(device.device_id)}/>",
        "  </source>",
        *_alias_line(alias),
        "</hostdev>",
    ]
    return "\n".join(lines)


def _pci_hostdev(device: Device, alias: str) -> str:
    domain, bus, rest = device.device_id.split(":")
    slot, function = rest.split(".")
    lines = [
        # The function is bound to vfio-pci already (that is how vfiocaps found it).
        "<hostdev mode='subsystem' type='pci' managed='no'>",
        "  <source>",
        f"    <address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>",
        "  </source>",
        *_alias_line(alias),
        "</hostdev>",
    ]
    return "\n".join(lines)


def _graphics(
    caps: Capabilities, viewer: Viewer, render_node: Path | None, notes: list[str]
) -> str:
    if caps.display is Display.REGION:
        return "<graphics type='vnc'/>"
    rendernode = f" rendernode={_attribute(str(render_node))}" if render_node else ""
    if render_node is None:
        notes.append(
            "the dma-buf display needs OpenGL on a DRM render node (dri/renderD*) and this "
            "host has none: QEMU will not start the VM until one exists"
        )
    if caps.gl_detail and caps.gl_host is not GlHost.NO_RENDER_NODE:
        notes.append(f"OpenGL on this host: {caps.gl_host.value}: {caps.gl_detail}")
    if viewer is Viewer.LOCAL:
        return (
            "<graphics type='spice'>\n"
            "  <listen type='none'/>\n"
            f"  <gl enable='yes'{rendernode}/>\n"
            "</graphics>"
        )
    notes.append(
        "no viewer comes with the dma-buf display for a remote viewer: QEMU 10 refuses VNC on "
        'a dma-buf console ("The console requires display DMABUF support"), so '
        "egl-headless alone gives the display its OpenGL and the VM starts; on the host, "
        "SPICE with OpenGL shows it (the local viewer's parts)"
    )
    return f"<graphics type='egl-headless'>\n  <gl{rendernode}/>\n</graphics>"


def _qemu_override(alias: str, options: tuple[tuple[str, str], ...]) -> str:
    # QEMU's OnOffAuto properties accept only strings: type='bool' is refused.
    properties = [
        f"      <qemu:property name={_attribute(name)} type='string' value={_attribute(value)}/>"
        for name, value in options
    ]
    lines = [
        "<qemu:override>",
        f"  <qemu:device alias={_attribute(alias)}>",
        "    <qemu:frontend>",
        *properties,
        "    </qemu:frontend>",
        "  </qemu:device>",
        "</qemu:override>",
    ]
    return "\n".join(lines)
