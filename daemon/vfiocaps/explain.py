"""What ``vfiocapsctl show`` prints: a device's answer, the evidence for it, and its libvirt XML."""

from __future__ import annotations

import datetime
from typing import Any

from .domainxml import DomainParts

DISPLAY_MEANING = {
    "none": "no display for the VM",
    "region": "region display: shown without OpenGL (VNC, SPICE)",
    "dmabuf": "dma-buf display: needs OpenGL on the host (a DRM render node)",
    "unknown": "not known yet",
}
GL_HOST_MEANING = {
    "set-up": "the GL display was set up (a guest's frames are not proven)",
    "crashed": "QEMU crashed on the GL path (the other answers stand)",
    "failed": "QEMU did not set the GL display up",
    "no-render-node": "no DRM render node: a VM with this device does not start here",
    "inaccessible": "a render node the probe user cannot open (left unchanged)",
    "not-needed": "not needed",
    "unknown": "not checked",
}
MIGRATION_MEANING = {
    "supported": "supported with QEMU's defaults (as libvirt, KubeVirt and Nova start it)",
    "unsupported": "not with QEMU's defaults (as libvirt, KubeVirt and Nova start it)",
    "unknown": "not known yet",
}


def _when(microseconds: int) -> str:
    if not microseconds:
        return "never"
    moment = datetime.datetime.fromtimestamp(microseconds / 1e6, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _rows(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(key) for key, _ in rows), default=0)
    return [title, *(f"  {key:<{width}}  {value}" for key, value in rows)]


def _with_options(device: dict[str, Any]) -> list[tuple[str, str]]:
    options = device.get("MigrationOptions") or []
    if not options:
        return []
    listed = ", ".join(f"{name}={value}" for name, value in options)
    return [("with options", f"{device.get('MigrationWithOptions', 'unknown')} with {listed}")]


def _gl_host(device: dict[str, Any]) -> list[tuple[str, str]]:
    if not device["GlRequired"]:
        return []
    host = device.get("GlHost") or "unknown"
    node = device.get("GlRenderNode") or ""
    where = f" on {node}" if node else ""
    return [("GL on host", f"{host}{where}: {GL_HOST_MEANING.get(host, host)}")]


def _migration_evidence(device: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    size = device.get("MigrationStateBytes") or 0
    if size:
        save = device.get("MigrationSaveSeconds") or 0.0
        load = device.get("MigrationLoadSeconds") or 0.0
        rows.append(
            (
                "round trip",
                f"{size} bytes of device state, saved in {save:.3f} s, loaded in {load:.3f} s",
            )
        )
    flags = device.get("MigrationFlags") or []
    if flags:
        rows.append(("kernel flags", ", ".join(flags)))
    tracking = device.get("DeviceDirtyTracking")
    if tracking:
        rows.append(("dirty tracking", f"by the device: {tracking}"))
    for name, verdict, decider, reason in device.get("MigrationConditions") or []:
        detail = f": {reason}" if reason else ""
        rows.append(("condition", f"{name}: {verdict} (decided by {decider}){detail}"))
    return rows


def render_value(name: str, value: Any) -> str:
    """One Device property's value as ``show`` prints it: times in UTC, seconds to the
    millisecond, options and conditions spelled out, lists joined, booleans as yes/no."""
    if name == "ProbedAt" and isinstance(value, int) and not isinstance(value, bool):
        return _when(value)
    if name.endswith("Seconds") and isinstance(value, int | float):
        return f"{value:.3f} s"
    if name == "MigrationStateBytes" and isinstance(value, int):
        return f"{value} bytes" if value else "-"
    if name == "MigrationOptions" and isinstance(value, list):
        return ", ".join(f"{pair[0]}={pair[1]}" for pair in value if len(pair) == 2) or "-"
    if name == "MigrationConditions" and isinstance(value, list):
        return (
            "; ".join(
                f"{row[0]}: {row[1]} (decided by {row[2]})" + (f": {row[3]}" if row[3] else "")
                for row in value
                if len(row) == 4
            )
            or "-"
        )
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "-"
    return str(value) if value not in ("", None) else "-"


def migration_summary(values: dict[str, Any]) -> str:
    """The migration verdict in one cell: QEMU's defaults, and with options when they differ."""
    migration = str(values.get("Migration") or "unknown")
    with_options = str(values.get("MigrationWithOptions") or migration)
    if with_options == migration:
        return migration
    if with_options == "supported":
        return "supported with options"  # only: not with QEMU's defaults
    return f"{migration}; with options {with_options}"


def explain(
    device: dict[str, Any],
    parts: dict[str, str] | None,
    parts_error: str = "",
    viewer: str = "remote",
    emulated: bool = False,
) -> str:
    """The text of ``vfiocapsctl show`` for *device* (its Device properties) and its domain
    *parts* (or, when there are none, *parts_error*: why not)."""
    lines: list[str] = []
    if emulated:
        lines += ["EMULATED HOST: these answers come from a demonstration, not from hardware.", ""]
    type_name = f" ({device['TypeName']})" if device.get("TypeName") else ""
    kind = "mdev" if device.get("Uuid") else "VFIO PCI function"
    lines.append(
        f"{device['Id']}: {kind} of type {device['TypeId']}{type_name}, parent {device['Parent']}"
    )
    lines.append(f"sysfs: {device['SysfsPath']}")
    lines.append("")
    state = device["ProbeState"]
    if state == "done":
        display = device["Display"]
        gl = "required" if device["GlRequired"] else "not required"
        migration = device["Migration"]
        lines += _rows(
            "Answer",
            [
                ("display", f"{display}: {DISPLAY_MEANING.get(display, display)}"),
                ("OpenGL", gl),
                *_gl_host(device),
                ("migration", f"{migration}: {MIGRATION_MEANING.get(migration, migration)}"),
                *_with_options(device),
            ],
        )
    else:
        lines += _rows("Answer", [("none yet", f"probe state {state}")])
    evidence = [
        ("probed", f"{_when(device['ProbedAt'])}, QEMU {device['QemuVersion'] or '-'}"),
        ("driver", f"{device['Driver'] or '-'} {device['DriverVersion']}".rstrip()),
        ("device api", device["DeviceApi"] or "-"),
    ]
    if device.get("GlDetail"):
        evidence.append(("gl", device["GlDetail"]))
    evidence += _migration_evidence(device)
    evidence += [("blocker", text) for text in device["MigrationBlockers"]]
    evidence += [("note", text) for text in device["MigrationNotes"]]
    if device["LastError"]:
        evidence.append(("last error", device["LastError"]))
    lines += ["", *_rows("Why", evidence), ""]
    if parts is None:
        lines.append(f"libvirt domain XML: none ({parts_error})")
    else:
        other = "local" if viewer == "remote" else "remote"
        lines.append(f"libvirt domain XML for a {viewer} viewer (--viewer {other} for the other):")
        lines.append(DomainParts.from_names(parts).fragment().rstrip("\n"))
    return "\n".join(lines) + "\n"
