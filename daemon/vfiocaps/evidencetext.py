"""Text QEMU, drivers and vendors wrote, made safe to store and show: no control characters."""

from __future__ import annotations

import re
from dataclasses import replace

from .capabilities import Capabilities, MigrationCondition, ProbeReport

# C0 controls but tab and newline, DEL, and the C1 controls (a lone 0x9b starts a CSI sequence
# on many terminals). Tabs and newlines lay out multi-line stderr and move no cursor back.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """*text* without C0/C1 control characters (an escape sequence loses its ESC and so
    prints as plain characters). Raises nothing."""
    return _CONTROL.sub("", text)


def _texts(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(printable(value) for value in values)


def clean_capabilities(capabilities: Capabilities) -> Capabilities:
    """*capabilities* with every text field passed through :func:`printable`."""
    return replace(
        capabilities,
        migration_blockers=_texts(capabilities.migration_blockers),
        migration_notes=_texts(capabilities.migration_notes),
        qemu_version=printable(capabilities.qemu_version),
        migration_options=tuple(
            (printable(name), printable(value)) for name, value in capabilities.migration_options
        ),
        migration_flags=_texts(capabilities.migration_flags),
        migration_conditions=tuple(
            MigrationCondition(
                printable(condition.condition),
                condition.verdict,
                condition.decided_by,
                printable(condition.reason),
            )
            for condition in capabilities.migration_conditions
        ),
        gl_render_node=printable(capabilities.gl_render_node),
        gl_detail=printable(capabilities.gl_detail),
    )


def clean_report(report: ProbeReport) -> ProbeReport:
    """*report* with its error, stderr excerpt, notes and capabilities made printable (the
    launches' argv is the daemon's own)."""
    return replace(
        report,
        capabilities=None
        if report.capabilities is None
        else clean_capabilities(report.capabilities),
        error=printable(report.error),
        stderr_excerpt=printable(report.stderr_excerpt),
        notes=_texts(report.notes),
    )
