"""Reading one launch's evidence: QMP replies, the console linked to the device, whose blockers."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping
from typing import Any

from ..capabilities import Display
from .messages import Meaning, first_failure
from .migration import MigrationResult

# query-migrate statuses after which a migration does not change any more.
FINAL_MIGRATION_STATES = frozenset({"completed", "failed", "cancelled"})


def linked_console(consoles: Mapping[str, str], device_path: str) -> str | None:
    """The console whose ``device`` link names the device, or ``None``. Raises nothing."""
    wanted = device_path.rstrip("/")
    for name, linked in consoles.items():
        if linked and linked.rstrip("/") == wanted:
            return name
    return None


def display_from_consoles(consoles: Mapping[str, str], device_path: str) -> Display:
    """REGION when a console's ``device`` link names the device, else NONE. Raises nothing."""
    return Display.NONE if linked_console(consoles, device_path) is None else Display.REGION


def device_blockers(
    blocked_reasons: Iterable[str], names: Iterable[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split migration blockers into (this device's, others').

    A blocker is the device's when it names the device (QEMU 10 prefixes them with the device
    name) or is one of the known VFIO migration blocker texts (QEMU 7.2 names no device).
    """
    names = [name for name in names if name]
    mine: list[str] = []
    others: list[str] = []
    for reason in blocked_reasons:
        failure = first_failure(reason)
        known_vfio = failure is not None and failure.meaning in (
            Meaning.MIGRATION_UNSUPPORTED,
            Meaning.DIRTY_TRACKING_UNSUPPORTED,
        )
        (mine if known_vfio or any(name in reason for name in names) else others).append(reason)
    return tuple(mine), tuple(others)


def describe_status(status: int | None) -> str:
    """``exited with status 1`` / ``was killed by SIGSYS`` / ``ended``. Raises nothing."""
    if status is None:
        return "ended"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        hint = " (a seccomp sandbox violation)" if -status == signal.SIGSYS else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {status}"


def strip_option_prefix(line: str) -> str:
    """Drop ``qemu-system-x86_64: -device vfio-pci,...: `` in front of a realize error."""
    if ": -device " in line:
        _, _, rest = line.partition(": -device ")
        _, sep, message = rest.partition(": ")
        return message if sep else line
    return line


def console_names(qom_list_reply: Any) -> tuple[str, ...]:
    """The ``console[N]`` children in a ``qom-list /backend`` reply. Raises nothing."""
    if not isinstance(qom_list_reply, list):
        return ()
    names = (str(child.get("name", "")) for child in qom_list_reply if isinstance(child, dict))
    return tuple(name for name in names if name.startswith("console["))


def blocked_reasons(query_migrate_reply: Any) -> tuple[str, ...]:
    """The ``blocked-reasons`` of a ``query-migrate`` reply (absent: none). Raises nothing."""
    if not isinstance(query_migrate_reply, dict):
        return ()
    reasons = query_migrate_reply.get("blocked-reasons", [])
    return tuple(str(reason) for reason in reasons) if isinstance(reasons, list) else ()


def migration_result(query_migrate_reply: Any, duration: float) -> MigrationResult | None:
    """The final result in a ``query-migrate`` reply, or ``None`` while it is still running.

    The device's saved state size is the ``vfio`` ``transferred`` counter. Raises nothing.
    """
    info = query_migrate_reply if isinstance(query_migrate_reply, dict) else {}
    status = str(info.get("status", ""))
    if status not in FINAL_MIGRATION_STATES:
        return None
    vfio = info.get("vfio")
    device_bytes = vfio.get("transferred") if isinstance(vfio, dict) else None
    return MigrationResult(
        status=status,
        error=str(info.get("error-desc", "")),
        device_bytes=device_bytes if isinstance(device_bytes, int) else None,
        duration=duration,
    )
