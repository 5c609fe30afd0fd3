"""A umockdev host of eight NVIDIA SR-IOV GPUs with 64 VFs each (512), for the profile benchmark.

Each GPU is laid out as the H100 fixture of ``tests/support/umockdev_sriov.py`` (its notes name
the sources): VFs on ``nvidia`` with ``vfio-dev`` and the ``nvidia/`` profile files; setting a
profile sends no uevent. ``send_change`` sends the ``change`` uevent a driver could send, for the
floor of the appearance latency.
"""

from __future__ import annotations

import dataclasses
import sys

from support import umockdev_sriov
from support.umockdev_hosts import serve
from support.umockdev_sriov import H100, SriovHostBuilder, SriovMockHost

GPUS = 8
VFS_PER_GPU = 64
KEYS = tuple(f"gpu{index}" for index in range(GPUS))


def _register_specs() -> None:
    for index, key in enumerate(KEYS):
        umockdev_sriov.FUNCTIONS[key] = dataclasses.replace(
            H100,
            key=key,
            address=f"0000:{0x41 + index:02x}:00.0",
            vf_count=VFS_PER_GPU,
            total_vfs=VFS_PER_GPU,
        )


def vf_addresses() -> list[str]:
    """Every VF of the host."""
    specs = [umockdev_sriov.FUNCTIONS[key] for key in KEYS]
    return [spec.vf_address(i) for spec in specs for i in range(VFS_PER_GPU)]


class ProfileBenchBuilder(SriovHostBuilder):
    """The builder, plus a ``change`` uevent on demand."""

    def send_change(self, address: str) -> None:
        device = (self.sys / "bus" / "pci" / "devices" / address).resolve()
        self.uevent("/" + str(device.relative_to(self.sys)), "change")


class ProfileBenchHost(SriovMockHost):
    """:class:`SriovMockHost` running this module (so the eight GPUs exist in its process)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.profile_host"]

    def send_change(self, address: str) -> None:
        self.call("send_change", address=address)


_register_specs()

if __name__ == "__main__":
    serve(iter(sys.stdin.readline, ""), sys.stdout, ProfileBenchBuilder)
