"""One stable, parseable log line per discovery event: ``event <Kind> key=value ...``."""

from __future__ import annotations

import re

from ..model import (
    Device,
    DeviceAdded,
    DeviceRemoved,
    DiscoveryEvent,
    DriverChanged,
    DriverIdentity,
    ParentRegistered,
    ParentUnregistered,
    Resynchronised,
)

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:+@/-,")
_ALL_SAFE = re.compile(r"[A-Za-z0-9._:+@/,-]+")


def quote_value(value: str | None) -> str:
    """``-`` for nothing; otherwise the value with every byte outside a safe set as ``%XX``."""
    if not value:
        return "-"
    if _ALL_SAFE.fullmatch(value):  # the usual case: nothing to quote
        return value
    return "".join(
        char if char in _SAFE else "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
        for char in value
    )


def _driver_fields(driver: DriverIdentity | None) -> str:
    if driver is None:
        return "driver=- version=- source=-"
    return (
        f"driver={quote_value(driver.module)} version={quote_value(driver.version)} "
        f"source={quote_value(driver.version_source)}"
    )


def _device_fields(device: Device) -> str:
    return (
        f"id={quote_value(device.device_id)} kind={device.kind.value} "
        f"parent={quote_value(device.parent)} type={quote_value(device.type_id)} "
        f"{_driver_fields(device.driver)} group={quote_value(device.iommu_group)}"
    )


def format_event(event: DiscoveryEvent) -> str:
    """The log line for *event*; field order and names are stable.

    Raises:
        TypeError: *event* is not a discovery event.
    """
    if isinstance(event, DeviceAdded):
        return f"event DeviceAdded {_device_fields(event.device)}"
    if isinstance(event, DeviceRemoved):
        return f"event DeviceRemoved {_device_fields(event.device)}"
    if isinstance(event, ParentRegistered):
        parent = event.parent
        types = ",".join(quote_value(t.type_id) for t in event.types)
        return (
            f"event ParentRegistered parent={quote_value(parent.name)} "
            f"subsystem={quote_value(parent.subsystem)} pci={quote_value(parent.pci_id)} "
            f"{_driver_fields(parent.driver)} types={types or '-'}"
        )
    if isinstance(event, ParentUnregistered):
        parent = event.parent
        return (
            f"event ParentUnregistered parent={quote_value(parent.name)} "
            f"{_driver_fields(parent.driver)}"
        )
    if isinstance(event, DriverChanged):
        old = event.old.version if event.old else None
        new = event.new.version if event.new else None
        return (
            f"event DriverChanged module={quote_value(event.module)} "
            f"old={quote_value(old)} new={quote_value(new)}"
        )
    if not isinstance(event, Resynchronised):
        raise TypeError(f"not a discovery event: {event!r}")
    snapshot = event.snapshot
    return (
        f"event Resynchronised parents={len(snapshot.parents)} types={len(snapshot.types)} "
        f"devices={len(snapshot.devices)}"
    )
