"""Capability records to and from rows of the ``capabilities`` table, and the SQL for them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..capabilities import (
    Capabilities,
    Decider,
    Display,
    GlHost,
    Migration,
    MigrationCondition,
    ProbeOutcome,
    clean_capabilities,
    printable,
)
from .records import CapabilityKey, CapabilityRecord

KEY_COLUMNS = (
    "driver",
    "driver_version",
    "kernel_release",
    "parent_pci_id",
    "type_id",
    "qemu_path",
    "qemu_version",
    "qemu_ctime_ns",
)
RECORD_COLUMNS = (
    *KEY_COLUMNS,
    "outcome",
    "display",
    "gl_required",
    "migration",
    "blockers",
    "notes",
    "error",
    "probed_at_us",
    "retry_at_us",
    "failures",
    "migration_with_options",
    "migration_options",
    "migration_state_bytes",
    "migration_save_seconds",
    "migration_load_seconds",
    "migration_flags",
    "device_dirty_tracking",
    "migration_conditions",
    "gl_host",
    "gl_render_node",
    "gl_detail",
)

# Built once from the constant column names above; values are always bound parameters.
SELECT_RECORDS = f"SELECT {', '.join(RECORD_COLUMNS)} FROM capabilities"  # noqa: S608
UPSERT_RECORD = (
    f"INSERT OR REPLACE INTO capabilities ({', '.join(RECORD_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in RECORD_COLUMNS)})"
)
DELETE_RECORD = "DELETE FROM capabilities WHERE " + " AND ".join(  # noqa: S608
    f"{name} = ?" for name in KEY_COLUMNS
)


def row_to_record(row: Sequence[Any]) -> CapabilityRecord:
    values = dict(zip(RECORD_COLUMNS, row, strict=True))
    key = CapabilityKey(**{name: values[name] for name in KEY_COLUMNS})
    outcome = ProbeOutcome(values["outcome"])
    capabilities = None
    if outcome is ProbeOutcome.OK:
        capabilities = Capabilities(
            display=Display(values["display"]),
            gl_required=bool(values["gl_required"]),
            migration=Migration(values["migration"]),
            migration_blockers=tuple(json.loads(values["blockers"])),
            migration_notes=tuple(json.loads(values["notes"])),
            qemu_version=key.qemu_version,
            migration_options=tuple(
                (str(name), str(value)) for name, value in json.loads(values["migration_options"])
            ),
            migration_with_options=Migration(values["migration_with_options"]),
            migration_state_bytes=int(values["migration_state_bytes"]),
            migration_save_seconds=float(values["migration_save_seconds"]),
            migration_load_seconds=float(values["migration_load_seconds"]),
            migration_flags=tuple(str(flag) for flag in json.loads(values["migration_flags"])),
            device_dirty_tracking=(
                None
                if values["device_dirty_tracking"] is None
                else bool(values["device_dirty_tracking"])
            ),
            migration_conditions=tuple(
                MigrationCondition(str(name), Migration(verdict), Decider(decider), str(reason))
                for name, verdict, decider, reason in json.loads(values["migration_conditions"])
            ),
            gl_host=GlHost(values["gl_host"]),
            gl_render_node=str(values["gl_render_node"]),
            gl_detail=str(values["gl_detail"]),
        )
    return CapabilityRecord(
        key=key,
        outcome=outcome,
        # A row an older version wrote may hold control characters a device or QEMU printed.
        capabilities=None if capabilities is None else clean_capabilities(capabilities),
        error=printable(str(values["error"])),
        probed_at_us=values["probed_at_us"],
        retry_at_us=values["retry_at_us"],
        failures=values["failures"],
    )


def record_to_row(record: CapabilityRecord) -> tuple[Any, ...]:
    caps = record.capabilities
    return (
        *(getattr(record.key, name) for name in KEY_COLUMNS),
        record.outcome.value,
        (caps.display if caps else Display.UNKNOWN).value,
        int(caps.gl_required) if caps else 0,
        (caps.migration if caps else Migration.UNKNOWN).value,
        json.dumps(list(caps.migration_blockers) if caps else []),
        json.dumps(list(caps.migration_notes) if caps else []),
        record.error,
        record.probed_at_us,
        record.retry_at_us,
        record.failures,
        (caps.migration_with_options if caps else Migration.UNKNOWN).value,
        json.dumps([list(pair) for pair in caps.migration_options] if caps else []),
        caps.migration_state_bytes if caps else 0,
        caps.migration_save_seconds if caps else 0.0,
        caps.migration_load_seconds if caps else 0.0,
        json.dumps(list(caps.migration_flags) if caps else []),
        None
        if caps is None or caps.device_dirty_tracking is None
        else int(caps.device_dirty_tracking),
        json.dumps(
            [
                [c.condition, c.verdict.value, c.decided_by.value, c.reason]
                for c in (caps.migration_conditions if caps else ())
            ]
        ),
        (caps.gl_host if caps else GlHost.UNKNOWN).value,
        caps.gl_render_node if caps else "",
        caps.gl_detail if caps else "",
    )
