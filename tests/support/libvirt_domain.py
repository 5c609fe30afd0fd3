"""A minimal libvirt domain around DomainXmlParts, and libvirt's own validator to judge it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

VALIDATOR = "virt-xml-validate"


def minimal_domain(parts: dict[str, str], name: str = "vfiocaps-check") -> str:
    """A q35 domain holding *parts* (as ``DomainXmlParts`` names them) where libvirt wants them."""
    namespace = parts.get("domain-namespace", "")
    devices = "\n".join(parts[key] for key in ("hostdev", "graphics", "video") if key in parts)
    return (
        f"<domain type='kvm'{' ' + namespace if namespace else ''}>\n"
        f"  <name>{name}</name>\n"
        "  <memory unit='MiB'>512</memory>\n"
        "  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n"
        f"  <devices>\n{devices}\n  </devices>\n"
        f"{parts.get('qemu-override', '')}\n"
        "</domain>\n"
    )


def validate(domain: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run libvirt's ``virt-xml-validate`` on *domain* against the ``domain`` schema."""
    validator = shutil.which(VALIDATOR)
    assert validator is not None, (
        f"{VALIDATOR} is missing: install libvirt-clients and libxml2-utils "
        "(scripts/apt-packages; ./scripts/bootstrap does it)"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "domain.xml"
    path.write_text(domain)
    return subprocess.run(
        [validator, str(path), "domain"], capture_output=True, text=True, timeout=60, check=False
    )
