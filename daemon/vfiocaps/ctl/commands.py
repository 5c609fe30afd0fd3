"""The vfiocapsctl commands that ask vfiocapsd over D-Bus, and how their answers are printed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..client import ClientError, Column, VfiocapsClient, as_json, key_values, table
from ..domainxml import DomainParts
from ..explain import explain, migration_summary, render_value
from .exits import EXIT_OK
from .migration import migration_command

EMULATED_WARNING = "an emulated host: these answers describe no real hardware"
EMULATED_KEY = "Emulated"  # the Manager property, repeated in every machine-readable answer

DEVICE_COLUMNS = (
    Column("ID", "Id"),
    Column("TYPE", "TypeId"),
    Column("DRIVER", "Driver"),
    Column("STATE", "ProbeState"),
    Column("DISPLAY", "Display"),
    Column("GL", "GlRequired"),
    Column("MIGRATION", "MigrationSummary"),
)
TYPE_COLUMNS = (
    Column("KIND", "Kind"),
    Column("PARENT", "Parent"),
    Column("TYPE", "TypeId"),
    Column("NAME", "Name"),
    Column("DRIVER", "Driver"),
    Column("INST", "Instances"),
    Column("AVAIL", "AvailableInstances"),
    Column("DISPLAY", "Display"),
    Column("GL", "GlRequired"),
    Column("MIGRATION", "MigrationSummary"),
)
# The longest cell of a column that can hold long text (type names, PCI addresses): with them
# `types` fits 100 columns for the usual ids. --json has every value in full, driver versions
# (often a sha256) included.
_TYPE_CELL_LIMITS = {"Name": 16, "Parent": 12}


_WITH_OPTIONS = "supported with options"
_WITH_OPTIONS_MARK = "supported*"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def daemon_command(args: argparse.Namespace, client: VfiocapsClient) -> int:
    want_json = bool(getattr(args, "json", False))
    command = args.command
    emulated = bool((await client.manager_properties()).get(EMULATED_KEY))
    if emulated and not want_json:
        print(f"vfiocapsctl: {EMULATED_WARNING}", file=sys.stderr)
    if command == "status":
        values = await client.manager_properties()
        print(as_json(values) if want_json else key_values(values))
    elif command == "list":
        devices = await client.devices()
        if want_json:
            print(as_json([{**device, EMULATED_KEY: emulated} for device in devices]))
        else:
            rows = [{**d, "MigrationSummary": migration_summary(d)} for d in devices]
            print(table(rows, DEVICE_COLUMNS))
    elif command in ("show", "refresh"):
        if command == "refresh":
            refreshed = await client.refresh(args.id)
            if want_json:
                print(as_json({**refreshed, EMULATED_KEY: emulated}))
                return EXIT_OK
        await _show(client, args.id, getattr(args, "viewer", "remote"), want_json, emulated)
    elif command == "types":
        types = await client.types()
        if want_json:
            print(as_json([{**entry, EMULATED_KEY: emulated} for entry in types]))
        else:
            rows = [_type_row(entry) for entry in types]
            print(table(rows, TYPE_COLUMNS))
            if any(row["MigrationSummary"] == _WITH_OPTIONS_MARK for row in rows):
                print(f"{_WITH_OPTIONS_MARK}: {_WITH_OPTIONS} (see 'vfiocapsctl show ID')")
    elif command == "probe-type":
        answer = await client.probe_type(args.parent, args.type_id)
        if want_json:
            print(as_json({**answer, EMULATED_KEY: emulated}))
        else:
            rendered = {key: render_value(key, value) for key, value in answer.items()}
            print(key_values(rendered))
    elif command == "invalidate":
        count = await client.invalidate(args.driver)
        print(as_json({"records": count}) if want_json else f"{count} records dropped")
    elif command == "xml":
        parts = await client.domain_xml_parts(args.id, args.viewer)
        xml = DomainParts.from_names(parts).fragment()
        if want_json:
            print(as_json({"xml": xml, "parts": parts, "emulated": emulated}))
        else:
            print(f"<!-- EMULATED HOST: {EMULATED_WARNING} -->\n" if emulated else "", end="")
            print(xml, end="")
    elif command == "migration":
        return await migration_command(args, client, want_json)
    elif command == "monitor":
        async for event in client.changes():
            if want_json:
                print(json.dumps({**event, "emulated": emulated}, sort_keys=True), flush=True)
            else:
                print(describe_event(event, emulated), flush=True)
    return EXIT_OK


async def _show(
    client: VfiocapsClient, device_id: str, viewer: str, want_json: bool, emulated: bool
) -> None:
    values = await client.device(device_id)
    parts, why = None, ""
    try:
        parts = await client.domain_xml_parts(device_id, viewer)
    except ClientError as err:
        why = err.message or err.name
    if want_json:
        shown = {**values, EMULATED_KEY: emulated}
        print(as_json({**shown, "DomainXmlParts": parts} if parts else shown))
    else:
        print(explain(values, parts, why, viewer, emulated), end="")


def _type_row(entry: dict[str, Any]) -> dict[str, Any]:
    summary = migration_summary(entry) if entry.get("Probed") else ""
    if summary == _WITH_OPTIONS:  # a footnote keeps the table within 100 columns
        summary = _WITH_OPTIONS_MARK
    row = {**entry, "MigrationSummary": summary}
    for key, limit in _TYPE_CELL_LIMITS.items():
        row[key] = _clip(str(entry.get(key) or ""), limit)
    return row


def describe_event(event: dict[str, Any], emulated: bool = False) -> str:
    """One line for a monitor event: what happened, to which device (by its id), and the
    values as ``show`` prints them."""
    kind = event["event"]
    target = event.get("id") or ("" if kind.startswith("device") else event.get("path", ""))
    details = "; ".join(
        f"{key}={render_value(key, value)}"
        for key, value in sorted(event.items())
        if key not in ("event", "path", "id")
    )
    line = " ".join(part for part in (kind, target, details) if part)
    return f"{line} (emulated)" if emulated else line
