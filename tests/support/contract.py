"""Reading D-Bus introspection XML into comparable structures (for the contract tests)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .harness import REPO

CONTRACT = REPO / "dbus" / "org.vfiocaps1.xml"
DOC = "org.gtk.GDBus.DocString"


def interfaces(xml: str) -> dict[str, dict[str, Any]]:
    """Interfaces of an introspection document: methods, properties and signals, docs left out.

    Argument names are compared for method inputs and signal arguments (callers see them);
    output argument names are not part of a method's signature on the wire.
    """
    root = ET.fromstring(xml)  # noqa: S314 - our own daemon's and repository's XML
    result: dict[str, dict[str, Any]] = {}
    for interface in root.findall("interface"):
        methods = {
            m.get("name"): [
                (
                    a.get("direction", "in"),
                    a.get("type"),
                    a.get("name") if a.get("direction", "in") == "in" else None,
                )
                for a in m.findall("arg")
            ]
            for m in interface.findall("method")
        }
        properties = {
            p.get("name"): (p.get("type"), p.get("access")) for p in interface.findall("property")
        }
        signals = {
            s.get("name"): [(a.get("type"), a.get("name")) for a in s.findall("arg")]
            for s in interface.findall("signal")
        }
        result[str(interface.get("name"))] = {
            "methods": methods,
            "properties": properties,
            "signals": signals,
        }
    return result


def contract() -> dict[str, dict[str, Any]]:
    return interfaces(CONTRACT.read_text())


def undocumented(path: Path = CONTRACT) -> list[str]:
    """Every element of the contract that lacks a DocString annotation."""
    root = ET.fromstring(path.read_text())  # noqa: S314 - the repository's own file
    missing = []
    for interface in root.findall("interface"):
        elements = [interface]
        for tag in ("method", "property", "signal"):
            for member in interface.findall(tag):
                elements.append(member)
                elements.extend(member.findall("arg"))
        for element in elements:
            docs = [a for a in element.findall("annotation") if a.get("name") == DOC]
            if not docs or not (docs[0].get("value") or "").strip():
                missing.append(f"{interface.get('name')}: {element.tag} {element.get('name')}")
    return missing
