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
