"""The QEMU binary that answers probes, as one value: what keys the cache and what probes need."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class QemuBinary:
    """One QEMU binary: resolved path, version and inode change time (as libvirt keys it),
    with its size and its ``vfio-pci`` properties (``None`` until they are asked).

    The engine's :class:`~vfiocaps.engine.qemu.QemuWatcher` owns it: it asks the version once
    per change of the file (or takes it from the store at a warm start), the properties when the
    first probe needs them, and hands it to each probe. Equal binaries share cached answers;
    ``size`` and the properties only tell a change and shape the probe, so they are not compared.
    """

    path: str
    version: str
    ctime_ns: int
    size: int = field(default=0, compare=False)
    vfio_pci_properties: frozenset[str] | None = field(default=None, compare=False)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """The version as numbers, e.g. ``(10, 0, 13)``."""
        return tuple(int(part) for part in self.version.split("."))
