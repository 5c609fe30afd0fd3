"""This boot's id, which records of lent nodes, temporary instances and profiles carry."""

from __future__ import annotations

from pathlib import Path

from .hostpaths import BOOT_ID_PATH

__all__ = ["BOOT_ID_PATH", "UNKNOWN_BOOT", "read_boot_id", "same_boot"]

# Under the unit's ProcSubset=pid /proc/sys is hidden: records then carry this instead. They live
# in the runtime directory, a tmpfs that no reboot keeps, so the id is a second guard only.
UNKNOWN_BOOT = "unknown"


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id, or :data:`UNKNOWN_BOOT` when the kernel's cannot be read. Raises nothing."""
    try:
        value = path.read_text()[:64].strip()
    except OSError:
        return UNKNOWN_BOOT
    if not value or not all(c in "0123456789abcdef-" for c in value):
        return UNKNOWN_BOOT
    return value


def same_boot(recorded: str, current: str) -> bool:
    """Whether a record made in boot *recorded* may be from this boot *current*: only two known,
    different ids say it is not."""
    if UNKNOWN_BOOT in (recorded, current) or not recorded or not current:
        return True
    return recorded == current
