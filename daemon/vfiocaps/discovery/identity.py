"""Driver identity: which module serves a device, and which version of it, by a fixed rule."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..model import DriverIdentity
from .sysfs import SysfsTree

log = logging.getLogger("vfiocaps.discovery")

SOURCE_MODULE_VERSION = "module-version"
SOURCE_SRCVERSION = "srcversion"
SOURCE_MODULE_FILE = "module-file"
SOURCE_KERNEL = "kernel"

# A module file larger than this is fingerprinted by its size and time, not by its content.
MODULE_FILE_LIMIT = 256 * 1024 * 1024
# modules.dep of a distribution kernel is about 1 MiB.
MODULES_DEP_LIMIT = 32 * 1024 * 1024


def _module_name(file_name: str) -> str:
    """``mdpy.ko.xz`` -> ``mdpy``; dashes become underscores as the kernel does."""
    return file_name.split(".ko", 1)[0].replace("-", "_")


@dataclass
class ModuleFiles:
    """Finds module files through ``<modules_root>/<release>/modules.dep`` and fingerprints them.

    Fingerprints are cached by the file's (path, size, mtime), and the index by the dep file's.
    """

    modules_root: Path
    kernel_release: str
    _index: dict[str, Path] = field(default_factory=dict)
    _index_stamp: tuple[int, int] | None = None
    _fingerprints: dict[tuple[str, int, int], str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.modules_root / self.kernel_release

    def _load_index(self) -> None:
        dep = self.directory / "modules.dep"
        try:
            info = os.stat(dep)
        except OSError as err:
            if self._index_stamp is not None:
                log.warning("modules: cannot read %s: %s", dep, err.strerror)
            self._index, self._index_stamp = {}, None
            return
        stamp = (info.st_size, info.st_mtime_ns)
        if stamp == self._index_stamp:
            return
        self._index_stamp = stamp
        self._index = {}
        if info.st_size > MODULES_DEP_LIMIT:
            log.warning("modules: %s is too large; ignored", dep)
            return
        try:
            text = dep.read_bytes().decode("utf-8", errors="replace")
        except OSError as err:
            log.warning("modules: cannot read %s: %s", dep, err.strerror)
            return
        for line in text.splitlines():
            name, sep, _ = line.partition(":")
            if not sep or not name.strip():
                continue
            relative = name.strip()
            if os.path.isabs(relative) or ".." in Path(relative).parts:
                continue
            self._index.setdefault(_module_name(Path(relative).name), self.directory / relative)

    def find(self, module: str) -> Path | None:
        """The file of *module* as modules.dep lists it, or ``None``."""
        self._load_index()
        return self._index.get(module.replace("-", "_"))

    def fingerprint(self, module: str) -> str | None:
        """``sha256:<hex>`` of the module file, ``stat:<size>:<mtime_ns>`` if it cannot be read,
        or ``None`` when no file is listed or the listed file is missing."""
        path = self.find(module)
        if path is None:
            return None
        try:
            info = os.stat(path)
        except OSError as err:
            log.warning("modules: %s for %s: %s", path, module, err.strerror)
            return None
        key = (str(path), info.st_size, info.st_mtime_ns)
        cached = self._fingerprints.get(key)
        if cached is not None:
            return cached
        by_stat = f"stat:{info.st_size}:{info.st_mtime_ns}"
        value = by_stat
        if info.st_size <= MODULE_FILE_LIMIT:
            digest = hashlib.sha256()
            try:
                with path.open("rb") as stream:
                    while chunk := stream.read(1 << 20):
                        digest.update(chunk)
                value = f"sha256:{digest.hexdigest()}"
            except OSError as err:
                log.warning("modules: cannot read %s (%s); using its size and time", path, err)
                value = by_stat
        self._fingerprints[key] = value
        return value


@dataclass
class IdentityResolver:
    """Applies the :class:`~vfiocaps.model.DriverIdentity` version rule to a module name."""

    sysfs: SysfsTree
    files: ModuleFiles

    @property
    def kernel_release(self) -> str:
        return self.files.kernel_release

    def identify(self, module: str) -> DriverIdentity | None:
        """The identity of *module* as loaded now, or ``None`` if it is not loaded.

        ``/sys/module/<m>/version``, else ``srcversion``, else the module file's fingerprint,
        else (built-in drivers, or a loaded module whose file cannot be found) the kernel release.
        """
        if not _valid_name(module):
            log.warning("driver: %r is not a module name; ignored", module[:64])
            return None
        module_dir = self.sysfs.resolve(self.sysfs.path(f"module/{module}"))
        if module_dir is None or not os.path.isdir(module_dir):
            return None
        release = self.kernel_release
        for name, source in (("version", SOURCE_MODULE_VERSION), ("srcversion", SOURCE_SRCVERSION)):
            value = self.sysfs.read_attribute(module_dir, name)
            if value and _printable(value):
                return DriverIdentity(module, value, source, release)
        built_in = self.sysfs.read_attribute(module_dir, "initstate") is None
        if not built_in:
            fingerprint = self.files.fingerprint(module)
            if fingerprint is not None:
                return DriverIdentity(module, fingerprint, SOURCE_MODULE_FILE, release)
            log.warning(
                "driver: module %s has no version and no file in %s; using the kernel release",
                module,
                self.files.directory,
            )
        return DriverIdentity(module, release, SOURCE_KERNEL, release)

    def driver_module(self, device_dir: Path) -> tuple[str, str | None] | None:
        """``(driver name, module name or None if built in)`` of the driver bound to a device."""
        driver_dir = self.sysfs.resolve(device_dir / "driver")
        if driver_dir is None:
            return None
        driver = driver_dir.name
        module = self.sysfs.link_name(driver_dir / "module")
        return driver, module

    def identify_driver(self, device_dir: Path) -> DriverIdentity | None:
        """The identity of the driver bound to the device at *device_dir* (``None``: unbound)."""
        bound = self.driver_module(device_dir)
        if bound is None:
            return None
        driver, module = bound
        if module is None:
            release = self.kernel_release
            if not _valid_name(driver):
                return None
            return DriverIdentity(driver.replace("-", "_"), release, SOURCE_KERNEL, release)
        return self.identify(module)


def _printable(value: str) -> bool:
    return value.isprintable() and len(value) <= 256


def _valid_name(name: str) -> bool:
    return (
        bool(name)
        and len(name) <= 64
        and all(c.isalnum() or c in "_-" for c in name)
        and (name.isascii())
    )
