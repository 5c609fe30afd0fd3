"""Running the repository's libvirt QEMU hook as libvirtd does: a process, the XML on stdin."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from .harness import REPO

HOOK = REPO / "libvirt" / "hooks" / "qemu.d" / "vfiocaps"


def domain_xml(name: str, uuid: str, mdevs: tuple[str, ...] = (), pci: tuple[str, ...] = ()) -> str:
    """A domain as libvirt hands it to a hook, with these mdev and PCI host devices."""
    devices = [
        "<hostdev mode='subsystem' type='mdev' model='vfio-pci'>"
        f"<source><address uuid='{uuid_}'/></source></hostdev>"
        for uuid_ in mdevs
    ]
    for address in pci:
        domain, bus, rest = address.split(":")
        slot, function = rest.split(".")
        devices.append(
            "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
            f"<address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>"
            "</source></hostdev>"
        )
    return (
        f"<domain type='kvm' id='1'><name>{name}</name><uuid>{uuid}</uuid>"
        "<memory unit='KiB'>524288</memory><os><type arch='x86_64'>hvm</type></os>"
        f"<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{''.join(devices)}</devices>"
        "</domain>\n"
    )


@dataclass(frozen=True)
class HookRun:
    """What one run of the hook did."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_hook(
    bus_address: str,
    name: str,
    operation: str,
    sub_operation: str,
    stdin: bytes | str,
    timeout: float = 30,
) -> HookRun:
    """Run the hook as libvirtd does (``<hook> <domain> <op> <sub-op> -``, minimal environment,
    the domain XML on stdin), the system bus being *bus_address*."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": bus_address}
    started = time.monotonic()
    done = subprocess.run(
        [str(HOOK), name, operation, sub_operation, "-"],
        input=data,
        capture_output=True,
        env=environment,
        timeout=timeout,
        check=False,
    )
    return HookRun(
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
        time.monotonic() - started,
    )
