"""The lab guest offers what the rest of the suite relies on (independent of the daemon)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from labkit import SAMPLE_DRIVERS, MdevLab, installed_module_path, lab_module_variant

# Types the kernel 6.12 samples register (facts of the sample drivers' sources).
SAMPLE_TYPE_IDS = {
    "mtty": {"mtty-1", "mtty-2"},
    "mdpy": {"mdpy-vga", "mdpy-xga", "mdpy-hd"},
    "mbochs": {"mbochs-small", "mbochs-medium", "mbochs-large"},
}


def modinfo(field: str, module: Path) -> str:
    return subprocess.run(
        ["modinfo", "-F", field, str(module)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_kernel_and_qemu_are_recent() -> None:
    major, minor = map(int, os.uname().release.split(".")[:2])
    assert (major, minor) >= (6, 12), os.uname().release
    version = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"version (\d+)\.", version)
    assert found, version
    assert int(found.group(1)) >= 10, version


def test_nested_kvm_is_available() -> None:
    assert Path("/dev/kvm").exists(), "kvm_amd did not give the guest a /dev/kvm"


def test_sample_drivers_offer_their_types(mdevs: MdevLab) -> None:
    for module in SAMPLE_DRIVERS:
        types = mdevs.types(module)
        assert set(types) == SAMPLE_TYPE_IDS[module], types
        for type_id in types:
            api = mdevs.parent_dir(module) / "mdev_supported_types" / type_id / "device_api"
            assert api.read_text().strip() == "vfio-pci"


def test_update_build_of_mtty_has_another_version(mdevs: MdevLab) -> None:
    base = modinfo("version", lab_module_variant("base", "mtty"))
    update = modinfo("version", lab_module_variant("update", "mtty"))
    assert base
    assert update != base
    assert mdevs.module_version("mtty") == modinfo("version", installed_module_path("mtty"))
    for module in SAMPLE_DRIVERS:
        release = modinfo("vermagic", installed_module_path(module)).split()[0]
        assert release == os.uname().release
