"""The device-id grammar: what the kernel writes, and what callers may write for it."""

from __future__ import annotations

import pytest

from vfiocaps.ids import canonical_device_id, is_mdev_uuid, is_pci_address

UUID = "6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01"


def test_the_kernel_forms() -> None:
    assert is_mdev_uuid(UUID)
    assert not is_mdev_uuid(UUID.upper())  # sysfs names are lower-case
    assert is_pci_address("0000:65:00.4")
    assert is_pci_address("10000:65:00.4")  # a PCI domain above 0xffff (VMD)
    assert not is_pci_address("65:00.4")
    assert not is_pci_address("0000:65:00.8")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (UUID, UUID),
        (UUID.upper(), UUID),
        ("0000:65:00.4", "0000:65:00.4"),
        ("0000:65:0A.4", "0000:65:0a.4"),
        ("65:00.4", "0000:65:00.4"),
        (f" {UUID}", None),
        (f"{UUID}\n", None),
        ("65:00.9", None),
        ("/sys/bus/mdev/devices/" + UUID, None),
        ("", None),
    ],
)
def test_callers_forms(text: str, canonical: str | None) -> None:
    assert canonical_device_id(text) == canonical
