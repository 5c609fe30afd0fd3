"""Guest-side lab helpers for libvirt: minimal domains around the daemon's XML, and virsh."""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
CONNECT = "qemu:///system"
DOMAIN_PREFIX = "vfiocaps-lab-"
# Under emulation the first start makes libvirt probe QEMU's capabilities: tens of seconds.
VIRSH_TIMEOUT = 400.0
PICKED = {"hostdev": "hostdevs", "graphics": "graphics", "video": "video"}

ET.register_namespace("qemu", QEMU_NS)


@dataclass
class DomainParts:
    """The elements a domain takes from an XML answer: hostdevs, graphics, video, overrides."""

    hostdevs: list[ET.Element] = field(default_factory=list)
    graphics: list[ET.Element] = field(default_factory=list)
    video: list[ET.Element] = field(default_factory=list)
    overrides: list[ET.Element] = field(default_factory=list)

    def extend(self, other: DomainParts) -> None:
        """Add *other*'s elements to these."""
        self.hostdevs += other.hostdevs
        self.graphics += other.graphics
        self.video += other.video
        self.overrides += other.overrides

    def hostdev_aliases(self) -> list[str]:
        """The user aliases (``ua-...``) the hostdevs carry."""
        return [
            str(alias.get("name"))
            for hostdev in self.hostdevs
            for alias in hostdev.findall("alias")
            if alias.get("name")
        ]

    def overridden_aliases(self) -> list[str]:
        """The device aliases ``<qemu:override>`` sets frontend properties of."""
        return [
            str(device.get("alias"))
            for override in self.overrides
            for device in override.findall(f"{{{QEMU_NS}}}device")
        ]


def parse_parts(text: str) -> DomainParts:
    """The domain elements in *text*: one fragment, several, or a whole ``<domain>``.

    The fragments may use the ``qemu:`` prefix without declaring it (it is declared on the
    domain they go into); comments and an XML declaration are ignored.
    """
    body = text.strip()
    if body.startswith("<?xml"):
        body = body.split("?>", 1)[1]
    root = ET.fromstring(f"<parts xmlns:qemu='{QEMU_NS}'>{body}</parts>")  # noqa: S314
    parts = DomainParts()

    def walk(element: ET.Element) -> None:
        for child in element:
            if child.tag in PICKED:
                getattr(parts, PICKED[child.tag]).append(child)
            elif child.tag == f"{{{QEMU_NS}}}override":
                parts.overrides.append(child)
            else:
                walk(child)

    walk(root)
    return parts


# The parts DomainXmlParts names that hold domain elements, in the order they are read.
ELEMENT_PARTS = ("hostdev", "graphics", "video", "qemu-override")
NAMESPACE_PART = f"xmlns:qemu='{QEMU_NS}'"


def parts_from_named(named: dict[str, str]) -> DomainParts:
    """The domain elements of a DomainXmlParts answer ({part name: text}).

    The ``domain-namespace`` part must be exactly the attribute an override needs, present
    with an override and absent without one (the domain built here declares it).
    """
    unknown = set(named) - {*ELEMENT_PARTS, "domain-namespace", "notes"}
    assert not unknown, f"parts the lab does not know: {sorted(unknown)}"
    if "qemu-override" in named:
        assert named.get("domain-namespace") == NAMESPACE_PART, named.get("domain-namespace")
    else:
        assert "domain-namespace" not in named, named
    parts = DomainParts()
    for name in ELEMENT_PARTS:
        if name in named:
            parts.extend(parse_parts(named[name]))
    return parts


def serialised(parts: DomainParts) -> list[str]:
    """Every element of *parts* as canonical text, for comparing two answers."""
    return [
        ET.canonicalize(ET.tostring(element, encoding="unicode"), strip_text=True)
        for element in (*parts.hostdevs, *parts.graphics, *parts.video, *parts.overrides)
    ]


def domain(name: str, parts: DomainParts, kvm: bool | None = None) -> str:
    """A minimal q35 domain around *parts*: no disk, no network, the parts' devices.

    Without graphics in the parts, a local VNC server is added (``display='on'`` needs one);
    without video, ``<model type='none'/>`` (the device's display or ramfb is the screen).
    """
    if kvm is None:
        kvm = Path("/dev/kvm").exists()
    root = ET.Element("domain", type="kvm" if kvm else "qemu")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = "128"
    ET.SubElement(root, "vcpu").text = "1"
    os_element = ET.SubElement(root, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    devices = ET.SubElement(root, "devices")
    ET.SubElement(devices, "controller", type="usb", model="none")
    for element in parts.graphics or [ET.Element("graphics", type="vnc", listen="127.0.0.1")]:
        devices.append(element)
    if parts.video:
        devices.extend(parts.video)
    else:
        video = ET.SubElement(devices, "video")
        ET.SubElement(video, "model", type="none")
    devices.extend(parts.hostdevs)
    ET.SubElement(devices, "memballoon", model="none")
    root.extend(parts.overrides)
    # The qemu namespace is declared on <domain> whenever an override uses it.
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def libvirtd_journal(lines: int = 30) -> str:
    """The last lines libvirt's daemons logged (what a command that never answered was doing)."""
    return subprocess.run(
        [
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            "-n",
            str(lines),
            "-u",
            "libvirtd",
            "-u",
            "virtqemud",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout


@dataclass(frozen=True)
class Outcome:
    """What one libvirt command did."""

    command: str
    ok: bool
    output: str
    seconds: float

    def message(self) -> str:
        """The command's output on one line (libvirt's error message)."""
        return " ".join(self.output.split())


@dataclass
class Libvirt:
    """libvirt's QEMU driver on the guest's system connection, and a log of what it said."""

    log: list[dict[str, object]] = field(default_factory=list)

    def run(self, *argv: str, check: str = "", timeout: float = VIRSH_TIMEOUT) -> Outcome:
        """Run a command; log it under *check* (a short name of what it proves)."""
        started = time.monotonic()
        try:
            result = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
            ok, output = result.returncode == 0, (result.stdout + result.stderr).strip()
        except subprocess.TimeoutExpired:
            ok, output = False, f"no answer within {timeout:.0f} s; {libvirtd_journal()}"
        outcome = Outcome(" ".join(argv), ok, output, time.monotonic() - started)
        self.log.append(
            {
                "check": check,
                "command": outcome.command,
                "ok": outcome.ok,
                "seconds": round(outcome.seconds, 2),
                "output": outcome.message()[-2000:],
            }
        )
        return outcome

    def virsh(self, *args: str, check: str = "", timeout: float = VIRSH_TIMEOUT) -> Outcome:
        """``virsh -c qemu:///system ARGS``."""
        return self.run("virsh", "-q", "-c", CONNECT, *args, check=check, timeout=timeout)

    def state(self, name: str) -> str:
        """``virsh domstate``, or the error."""
        return self.virsh("domstate", name, check="state").output.strip()

    def remove(self, name: str) -> None:
        """Destroy (if running) and undefine a domain, and drop a managed save; never raises."""
        self.virsh("destroy", name, check="cleanup", timeout=120)
        self.virsh("undefine", name, "--managed-save", check="cleanup", timeout=120)

    def markdown(self) -> str:
        """The log as a table (for the results share)."""
        lines = ["| check | command | ok | s | libvirt said |", "|---|---|---|---|---|"]
        for entry in self.log:
            if entry["check"] in ("cleanup", "state"):
                continue
            cells = [str(entry[key]).replace("|", "/") for key in ("check", "command", "ok")]
            # libvirt's own words come last, after QEMU's command line and warnings.
            said = str(entry["output"]).replace("|", "/")
            said = said if len(said) <= 300 else "... " + said[-300:]
            lines.append(f"| {' | '.join(cells)} | {entry['seconds']} | {said} |")
        return "\n".join(lines) + "\n"
