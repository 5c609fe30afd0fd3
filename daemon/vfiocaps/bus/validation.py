"""Checking callers' strings before they reach the engine: device ids, driver and domain names."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from ..ids import canonical_device_id, is_mdev_uuid, name_problem

MAX_ID_LENGTH = 4096
MAX_NAME_LENGTH = 64

_MODULE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class DeviceRef:
    """A validated device reference: exactly one of ``device_id`` or ``sysfs_path`` is set."""

    device_id: str | None = None
    sysfs_path: str | None = None


def parse_device_id(value: str, sysfs_root: Path) -> DeviceRef:
    """Validate a caller's device id: an mdev UUID, a PCI address, or a sysfs path.

    UUIDs are normalised to lower case and PCI addresses to ``dddd:bb:ss.f``. A path must be
    absolute, name by its text a place in the device tree of *sysfs_root* (``<root>/devices``,
    or a device link under ``<root>/bus/*/devices`` or ``<root>/class/*``), and resolve
    (following links) into ``<root>/devices``, where every mdev and PCI device lives.

    Raises:
        InvalidArgumentError: the value is none of these, too long, or escapes sysfs.
    """
    if not value:
        raise InvalidArgumentError("a device id is required (UUID, PCI address or sysfs path)")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgumentError(f"device id longer than {MAX_ID_LENGTH} characters")
    if "\0" in value:
        raise InvalidArgumentError("device id contains a NUL character")
    canonical = canonical_device_id(value)
    if canonical is not None:
        return DeviceRef(device_id=canonical)
    if value.startswith("/"):
        return DeviceRef(sysfs_path=_resolve_sysfs_path(value, sysfs_root))
    raise InvalidArgumentError(f"not a UUID, PCI address or absolute sysfs path: {value[:80]!r}")


def _inside_device_tree(normal: str, root: str) -> bool:
    """Lexically: *normal* is below ``<root>/devices``, or a device link of the kernel's
    ``<root>/bus/<bus>/devices/<name>`` or ``<root>/class/<class>/<name>`` directories."""
    if os.path.commonpath([normal, root]) != root or normal == root:
        return False
    parts = os.path.relpath(normal, root).split(os.sep)
    if parts[0] == "devices":
        return len(parts) > 1
    if parts[0] == "bus":
        return len(parts) == 4 and parts[2] == "devices"
    return parts[0] == "class" and len(parts) == 3


def _resolve_sysfs_path(value: str, sysfs_root: Path) -> str:
    """The real path of a device named by a sysfs path, checked by its text before any file is
    looked at, so that every refusal is one message whether or not the path exists."""
    root = os.path.realpath(sysfs_root)
    refused = InvalidArgumentError(
        f"not a device path in the sysfs device tree ({root}/devices, or a link to a device in "
        f"{root}/bus/*/devices or {root}/class/*): {value[:200]!r}"
    )
    normal = os.path.normpath(value)
    if not _inside_device_tree(normal, root):
        raise refused
    try:
        resolved = os.path.realpath(normal, strict=True)
    except OSError:
        raise refused from None
    devices = os.path.join(root, "devices")
    if os.path.commonpath([resolved, devices]) != devices or resolved == devices:
        raise refused
    return resolved


def parse_driver_name(value: str) -> str:
    """Validate a kernel module name (also accepts ``kernel`` and ``qemu``).

    Raises:
        InvalidArgumentError: empty, too long, or not a module name.
    """
    if not value or len(value) > MAX_NAME_LENGTH or not _MODULE.fullmatch(value):
        raise InvalidArgumentError(
            f"not a kernel module name (letters, digits, '_' and '-', at most "
            f"{MAX_NAME_LENGTH}): {value[:80]!r}"
        )
    return value


MAX_DOMAIN_NAME_LENGTH = 256
MAX_HELD_DEVICES = 256
_DOMAIN_NAME = re.compile(r"^[^\x00-\x1f\x7f]+$")


def parse_domain(domain_uuid: str, name: str) -> tuple[str, str]:
    """Validate a libvirt domain's UUID (normalised to lower case) and name.

    Raises:
        InvalidArgumentError: the UUID is not one, or the name is empty, too long or has
            control characters.
    """
    lowered = domain_uuid.lower()
    if not is_mdev_uuid(lowered):
        raise InvalidArgumentError(f"not a domain UUID: {domain_uuid[:80]!r}")
    if len(name) > MAX_DOMAIN_NAME_LENGTH or not _DOMAIN_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"not a domain name (1 to {MAX_DOMAIN_NAME_LENGTH} characters, no control "
            f"characters): {name[:80]!r}"
        )
    return lowered, name


def parse_held_devices(values: list[str]) -> list[str]:
    """Validate the devices a domain holds: mdev UUIDs and PCI addresses, normalised.

    Raises:
        InvalidArgumentError: more than :data:`MAX_HELD_DEVICES`, or one is neither.
    """
    if len(values) > MAX_HELD_DEVICES:
        raise InvalidArgumentError(
            f"a domain holds at most {MAX_HELD_DEVICES} devices, {len(values)} given"
        )
    devices = []
    for value in values:
        canonical = canonical_device_id(value) if len(value) <= MAX_NAME_LENGTH else None
        if canonical is None:
            raise InvalidArgumentError(
                f"not an mdev UUID or a PCI address: {value[:80]!r}; name devices as the "
                "domain XML does"
            )
        devices.append(canonical)
    return sorted(set(devices))


def parse_type_name(parent: str, type_id: str) -> tuple[str, str]:
    """Validate a parent device name and an mdev type id by the one rule for such names
    (:func:`vfiocaps.ids.name_problem`), so that every type ListTypes shows is taken.

    Raises:
        InvalidArgumentError: either is empty, too long, not one path component, or holds
            unprintable characters.
    """
    for what, value in (("parent name", parent), ("mdev type id", type_id)):
        problem = name_problem(value)
        if problem is not None:
            raise InvalidArgumentError(
                f"not a valid {what}: {value[:80]!r} ({problem}); pass the name as ListTypes "
                "shows it"
            )
    return parent, type_id


_UNSAFE_IN_PATH = re.compile(r"[^A-Za-z0-9]")


def _escape_match(match: re.Match[str]) -> str:
    return "".join(f"_{byte:02x}" for byte in match.group().encode())


_ALNUM_AND_DASHES = re.compile(r"[A-Za-z0-9-]+")


def escape_path_element(value: str) -> str:
    """Escape *value* into one D-Bus object path element (as sd-bus does: ``_xx`` hex)."""
    if not value:
        return "_"
    if _ALNUM_AND_DASHES.fullmatch(value):  # a UUID: only its dashes need escaping
        return value.replace("-", "_2d")
    return _UNSAFE_IN_PATH.sub(_escape_match, value)
