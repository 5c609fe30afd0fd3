"""A umockdev host with many mdev types, for the scale benchmark.

Five sample-like parents (``vbench0`` ... ``vbench4``) with ten types each; the fake QEMU
treats them as region-display devices. Besides everything the test hosts can do, the wrapped
process can ``populate`` the host with many instances at once without sending their uevents
(the daemon under measurement starts afterwards and reads them from sysfs).
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any

from support import umockdev_hosts
from support.umockdev_hosts import HostBuilder, MockHost, TypeSpec

PARENT_COUNT = 5
TYPES_PER_PARENT = 10
MODULES = tuple(f"vbench{p}" for p in range(PARENT_COUNT))


def _register_specs() -> None:
    for module in MODULES:
        types = tuple(
            TypeSpec(f"{module}-t{t:02d}", f"bench {t}", 100_000, f"bench type {t}")
            for t in range(TYPES_PER_PARENT)
        )
        umockdev_hosts.PARENTS[module] = umockdev_hosts._sample(module, types, version="1.0")
    umockdev_hosts.HOSTS["scale"] = MODULES


def type_ids() -> list[tuple[str, str]]:
    """Every (module, type id) of the scale host."""
    return [(module, f"{module}-t{t:02d}") for module in MODULES for t in range(TYPES_PER_PARENT)]


class ScaleBuilder(HostBuilder):
    """A :class:`HostBuilder` that can add many instances quietly."""

    def populate(self, count: int) -> dict[str, Any]:
        """Add *count* instances round robin over every type, without uevents."""
        began = time.monotonic()
        for (module, type_id), _ in zip(itertools.cycle(type_ids()), range(count), strict=False):
            self.add_instance(module, type_id, deferred=[])
        return {"seconds": time.monotonic() - began, "instances": len(self.instances)}

    def instance_count(self) -> list[str]:
        """The UUIDs of every instance."""
        return list(self.instances)


class ScaleHost(MockHost):
    """:class:`MockHost` running this module (so the scale parents exist in the wrapped process)."""

    def command(self) -> list[str]:
        # Run from the top of the tree, as the benchmarks are (python -m bench).
        return [sys.executable, "-m", "bench.scale_host"]

    def populate(self, count: int) -> dict[str, Any]:
        return dict(self.call("populate", count=count))


_register_specs()

if __name__ == "__main__":
    umockdev_hosts.serve(iter(sys.stdin.readline, ""), sys.stdout, ScaleBuilder)
