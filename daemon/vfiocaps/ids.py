"""The device-id grammar: mdev UUIDs and PCI addresses, as the kernel and callers write them."""

from __future__ import annotations

import re

# As the kernel names them in sysfs: lower-case, a dashed UUID; a PCI address with its domain.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PCI_ADDRESS = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
# As a person may type them: any case; a PCI address without its domain means domain 0000.
_PCI_SHORT = re.compile(r"[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


def is_mdev_uuid(name: str) -> bool:
    """Tell whether *name* is an mdev UUID as the kernel writes it (lower-case, dashed)."""
    return _UUID.fullmatch(name) is not None


def is_pci_address(name: str) -> bool:
    """Tell whether *name* is a PCI address as the kernel writes it, such as ``0000:65:00.4``."""
    return _PCI_ADDRESS.fullmatch(name) is not None


def canonical_device_id(text: str) -> str | None:
    """*text* as the kernel names the device (``6f3b...`` or ``0000:65:00.4``), accepting any
    case and a PCI address without its domain; None when it is neither a UUID nor an address."""
    lowered = text.lower()
    if is_mdev_uuid(lowered) or is_pci_address(lowered):
        return lowered
    if _PCI_SHORT.fullmatch(lowered):
        return "0000:" + lowered
    return None


# Type ids and parent names are directory names in sysfs (``mdev_supported_types/<type id>``,
# ``class/mdev_bus/<parent>``) and are joined to paths when a type is instantiated: one rule
# says which such names vfiocaps accepts, from sysfs and from callers alike.
MAX_NAME_LENGTH = 128


def name_problem(name: str) -> str | None:
    """Why *name* (an mdev type id, a parent's or a profile's name) is not one vfiocaps takes,
    or None when it is: at most :data:`MAX_NAME_LENGTH` printable characters (spaces and
    punctuation allowed, as sysfs has them), not empty, not ``.`` or ``..``, without ``/``: a
    name that is safe as one path component and shown as it is."""
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is longer than {MAX_NAME_LENGTH} characters"
    if "/" in name or name in (".", ".."):
        return "it is not a single path component"
    if not name.isprintable():
        return "it holds control or unprintable characters"
    return None


def is_sysfs_name(name: str) -> bool:
    """Tell whether *name* passes :func:`name_problem`."""
    return name_problem(name) is None
