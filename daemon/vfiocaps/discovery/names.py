"""The names discovery accepts from sysfs: mdev UUIDs, PCI addresses, other object names."""

from __future__ import annotations

import re

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_MAX_NAME = 128


def is_mdev_uuid(name: str) -> bool:
    """Tell whether *name* is an mdev UUID as the kernel writes it (lower-case, dashed)."""
    return _UUID.match(name) is not None


def is_pci_address(name: str) -> bool:
    """Tell whether *name* is a PCI address such as ``0000:65:00.4``."""
    return _PCI_ADDRESS.match(name) is not None


def usable_name(name: str) -> bool:
    """Tell whether *name* (a type id, a parent or profile name) is short, printable and
    free of ``/``."""
    return 0 < len(name) <= _MAX_NAME and name.isprintable() and "/" not in name
