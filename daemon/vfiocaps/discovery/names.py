"""The names discovery accepts from sysfs besides device ids: types, parents, profiles."""

from __future__ import annotations

_MAX_NAME = 128


def usable_name(name: str) -> bool:
    """Tell whether *name* (a type id, a parent or profile name) is short, printable and
    free of ``/``."""
    return 0 < len(name) <= _MAX_NAME and name.isprintable() and "/" not in name
