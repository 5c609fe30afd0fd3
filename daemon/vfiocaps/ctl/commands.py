"""The vfiocapsctl commands that ask vfiocapsd over D-Bus, and how their answers are printed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..client import ClientError, Column, VfiocapsClient, as_json, key_values, table
from ..domainxml import DomainParts
from ..explain import explain
from .exits import EXIT_OK
from .migration import migration_command

DEVICE_COLUMNS = (
    Column("ID", "Id"),
    Column("TYPE", "TypeId"),
    Column("DRIVER", "Driver"),
    Column("STATE", "ProbeState"),
    Column("DISPLAY", "Display"),
    Column("GL", "GlRequired"),
    Column("MIGRATION", "Migration"),
)
TYPE_COLUMNS = (
    Column("KIND", "Kind"),
    Column("PARENT", "Parent"),
    Column("TYPE", "TypeId"),
    Column("NAME", "Name"),
    Column("DRIVER", "Driver"),
    Column("VERSION", "DriverVersion"),
    Column("INSTANCES", "Instances"),
    Column("AVAILABLE", "AvailableInstances"),
    Column("DISPLAY", "Display"),
    Column("GL", "GlRequired"),
    Column("MIGRATION", "Migration"),
)


async def daemon_command(args: argparse.Namespace, client: VfiocapsClient) -> int:
    want_json = bool(getattr(args, "json", False))
    command = args.command
    if command == "status":
        values = await client.manager_properties()
        print(as_json(values) if want_json else key_values(values))
    elif command == "list":
        devices = await client.devices()
        print(as_json(devices) if want_json else table(devices, DEVICE_COLUMNS))
        await _warn_if_emulated(client)
    elif command == "show":
        values = await client.device(args.id)
        parts, why = None, ""
        try:
            parts = await client.domain_xml_parts(args.id, args.viewer)
        except ClientError as err:
            why = err.message or err.name
        if want_json:
            print(as_json({**values, "DomainXmlParts": parts} if parts else values))
        else:
            emulated = bool((await client.manager_properties()).get("Emulated"))
            print(explain(values, parts, why, args.viewer, emulated), end="")
    elif command == "types":
        types = await client.types()
        print(as_json(types) if want_json else table(types, TYPE_COLUMNS))
        await _warn_if_emulated(client)
    elif command == "refresh":
        values = await client.refresh(args.id)
        print(as_json(values) if want_json else key_values(values))
    elif command == "invalidate":
        count = await client.invalidate(args.driver)
        print(as_json({"records": count}) if want_json else f"{count} records dropped")
    elif command == "xml":
        parts = await client.domain_xml_parts(args.id, args.viewer)
        xml = DomainParts.from_names(parts).fragment()
        print(
            as_json({"xml": xml, "parts": parts}) if want_json else xml,
            end="" if not want_json else "\n",
        )
    elif command == "migration":
        return await migration_command(args, client, want_json)
    elif command == "monitor":
        async for event in client.changes():
            if want_json:
                print(json.dumps(event, sort_keys=True), flush=True)
            else:
                print(_describe_event(event), flush=True)
    return EXIT_OK


async def _warn_if_emulated(client: VfiocapsClient) -> None:
    if (await client.manager_properties()).get("Emulated"):
        print(
            "vfiocapsctl: an emulated host: these answers describe no real hardware",
            file=sys.stderr,
        )


def _describe_event(event: dict[str, Any]) -> str:
    kind = event["event"]
    details = " ".join(
        f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in sorted(event.items())
        if key not in ("event", "path")
    )
    target = event.get("path", "")
    return f"{kind} {target} {details}".replace("  ", " ").strip()
