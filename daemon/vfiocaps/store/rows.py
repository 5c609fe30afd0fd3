"""Capability records to and from rows of the ``capabilities`` table, and the SQL for them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..capabilities import ProbeOutcome, clean_capabilities, printable
from ..capschema import DOCUMENT_VERSION, from_document, to_document
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
    "error",
    "probed_at_us",
    "retry_at_us",
    "failures",
    "document_version",
    "document",
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
    """The record a row holds.

    Raises:
        ValueError: the row does not hold a record of this schema (a DocumentError among them).
        TypeError, KeyError: the row's key is not what the schema says.
    """
    values = dict(zip(RECORD_COLUMNS, row, strict=True))
    key = CapabilityKey(**{name: values[name] for name in KEY_COLUMNS})
    outcome = ProbeOutcome(values["outcome"])
    capabilities = None
    if outcome is ProbeOutcome.OK:
        if values["document"] is None:
            raise ValueError(f"{key.describe()}: an answer without capabilities")
        document = json.loads(values["document"])
        capabilities = from_document(document, int(values["document_version"]))
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
    """The row that holds *record*."""
    caps = record.capabilities
    return (
        *(getattr(record.key, name) for name in KEY_COLUMNS),
        record.outcome.value,
        record.error,
        record.probed_at_us,
        record.retry_at_us,
        record.failures,
        DOCUMENT_VERSION,
        None if caps is None else json.dumps(to_document(caps), sort_keys=True),
    )
