"""Frozen daemon configuration: every system path and tunable, fixed once at start."""

from __future__ import annotations

import enum
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .hostpaths import BINARY_DIR, CACHE_DIR, DEV_ROOT, MODULES_ROOT, RUNTIME_DIR, SYSFS_ROOT

DEFAULT_PROBE_USER = "vfiocaps-probe"
# Bytes of migration stream a probe keeps (in the runtime directory, i.e. memory) for the load.
DEFAULT_MIGRATION_STREAM_LIMIT = 256 * 1024 * 1024
MAX_MIGRATION_STREAM_LIMIT = 64 * 1024 * 1024 * 1024
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BusKind(enum.Enum):
    """Which message bus the daemon connects to."""

    SYSTEM = "system"
    SESSION = "session"
    ADDRESS = "address"


@dataclass(frozen=True)
class BusChoice:
    """The bus to connect to: the system bus, the session bus, or an explicit address."""

    kind: BusKind = BusKind.SYSTEM
    address: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is BusKind.ADDRESS) != (self.address is not None):
            raise ConfigError("a bus address is given exactly when the bus kind is 'address'")
        if self.address is not None and ":" not in self.address:
            raise ConfigError(f"not a D-Bus address: {self.address!r}")

    @classmethod
    def from_options(cls, address: str | None, session: bool) -> BusChoice:
        """The bus that ``--bus-address``/``--session`` name (the system bus with neither).

        Raises:
            ConfigError: *address* is not a D-Bus address.
        """
        if address:
            return cls(BusKind.ADDRESS, address)
        return cls(BusKind.SESSION if session else BusKind.SYSTEM)

    def describe(self) -> str:
        """Return a human description such as ``system bus`` or ``bus at unix:path=...``."""
        if self.kind is BusKind.ADDRESS:
            return f"bus at {self.address}"
        return f"{self.kind.value} bus"


def default_qemu_binary(machine: str | None = None) -> Path:
    """Return the QEMU system emulator for this host's architecture (found on ``PATH`` if possible).

    Raises nothing: a missing binary is reported when a probe needs it, not at start-up.
    """
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        (machine or os.uname().machine).lower(), machine or os.uname().machine
    )
    name = f"qemu-system-{arch}"
    found = shutil.which(name)
    return Path(found) if found else BINARY_DIR / name


def _first_directory(value: str | None) -> Path | None:
    """systemd passes ``$CACHE_DIRECTORY`` etc. as colon-separated lists; take the first."""
    if not value:
        return None
    first = value.split(":", 1)[0]
    return Path(first) if first else None


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """``$CACHE_DIRECTORY`` (systemd), else the user's XDG cache, else /var/cache/vfiocaps."""
    from_systemd = _first_directory(environ.get("CACHE_DIRECTORY"))
    if from_systemd:
        return from_systemd
    if os.geteuid() != 0:
        home = Path(environ.get("HOME") or Path.home())
        xdg = environ.get("XDG_CACHE_HOME") or str(home / ".cache")
        return Path(xdg) / "vfiocaps"
    return CACHE_DIR


def default_runtime_dir(environ: Mapping[str, str]) -> Path:
    """``$RUNTIME_DIRECTORY`` (systemd), else ``$XDG_RUNTIME_DIR/vfiocaps``, else /run/vfiocaps."""
    from_systemd = _first_directory(environ.get("RUNTIME_DIRECTORY"))
    if from_systemd:
        return from_systemd
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg and os.geteuid() != 0:
        return Path(xdg) / "vfiocaps"
    return RUNTIME_DIR


def probe_environment_from(
    values: Iterable[str], environ: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    """``NAME=VALUE`` items as given, and ``NAME`` items with their value from *environ*.

    Raises:
        ConfigError: a name is malformed, or a bare name is not set in *environ*.
    """
    pairs = []
    for value in values:
        name, equals, given = value.partition("=")
        if not equals:
            if name not in environ:
                raise ConfigError(f"--probe-env {name}: {name} is not set in the environment")
            given = environ[name]
        pairs.append((name, given))
    return tuple(pairs)


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs to know about its host, fixed for the life of the process."""

    bus: BusChoice = field(default_factory=BusChoice)
    sysfs_root: Path = SYSFS_ROOT
    dev_root: Path = DEV_ROOT
    modules_root: Path = MODULES_ROOT
    kernel_release: str = field(default_factory=lambda: os.uname().release)
    cache_dir: Path = CACHE_DIR
    runtime_dir: Path = RUNTIME_DIR
    qemu_binary: Path = field(default_factory=default_qemu_binary)
    probe_user: str = DEFAULT_PROBE_USER
    probe_timeout: float = 30.0
    probe_concurrency: int = 2
    probe_retry_seconds: float = 30.0
    # How often vGPU profiles are compared with sysfs (their writes send no uevent).
    profile_scan_seconds: float = 5.0
    probe_types_without_instances: bool = False
    # How long a user's instance created while the daemon runs is left alone before its probe:
    # a VM may be starting on it (a probe holds the VFIO group, which VFIO gives one opener).
    probe_settle_seconds: float = 5.0
    # Answer such an instance by probing a temporary instance of its type, where it has room.
    prefer_temporary_instances: bool = False
    migration_stream_limit: int = DEFAULT_MIGRATION_STREAM_LIMIT
    # Variables the probe QEMU gets besides PATH and LC_ALL (test rigs: umockdev's UMOCKDEV_DIR
    # and LD_PRELOAD); never taken from the daemon's environment unless configured.
    probe_environment: tuple[tuple[str, str], ...] = ()
    # The longest wait for polkit's answer to an interactive check (a person at an agent).
    authorization_timeout: float = 120.0
    watchdog_usec: int = 0
    # node-feature-discovery's local source directory; None: no labels are published.
    nfd_features_dir: Path | None = None
    # The host is an emulation (a demonstration): every answer is marked as such.
    emulated: bool = False

    def __post_init__(self) -> None:
        for name in (
            "sysfs_root",
            "dev_root",
            "modules_root",
            "cache_dir",
            "runtime_dir",
            "qemu_binary",
        ):
            value = getattr(self, name)
            if not isinstance(value, Path) or not value.is_absolute():
                raise ConfigError(f"{name} must be an absolute path, got {value!r}")
        if self.nfd_features_dir is not None and not self.nfd_features_dir.is_absolute():
            raise ConfigError(
                f"the NFD features directory must be absolute: {self.nfd_features_dir}"
            )
        if not 0 < self.probe_timeout <= 3600:
            raise ConfigError(
                f"probe timeout must be in (0, 3600] seconds, got {self.probe_timeout}"
            )
        if not 0 < self.probe_retry_seconds <= 86400:
            raise ConfigError(
                f"probe retry must be in (0, 86400] seconds, got {self.probe_retry_seconds}"
            )
        if not 0 <= self.probe_settle_seconds <= 3600:
            raise ConfigError(
                f"probe settle time must be in [0, 3600] seconds, got {self.probe_settle_seconds}"
            )
        if not 0.05 <= self.profile_scan_seconds <= 3600:
            raise ConfigError(
                f"profile scan interval must be in [0.05, 3600] seconds, got "
                f"{self.profile_scan_seconds}"
            )
        if not 0 < self.authorization_timeout <= 3600:
            raise ConfigError(
                f"authorization timeout must be in (0, 3600] seconds, got "
                f"{self.authorization_timeout}"
            )
        if not 1 <= self.probe_concurrency <= 64:
            raise ConfigError(f"probe concurrency must be 1..64, got {self.probe_concurrency}")
        if not 1 <= self.migration_stream_limit <= MAX_MIGRATION_STREAM_LIMIT:
            raise ConfigError(
                f"migration stream limit must be 1..{MAX_MIGRATION_STREAM_LIMIT} bytes, "
                f"got {self.migration_stream_limit}"
            )
        if not self.probe_user or "\0" in self.probe_user or "/" in self.probe_user:
            raise ConfigError(f"invalid probe user {self.probe_user!r}")
        for name, value in self.probe_environment:
            if not _VARIABLE.fullmatch(name) or "\0" in value:
                raise ConfigError(f"invalid probe environment variable {name!r}")

    @property
    def database_path(self) -> Path:
        """The SQLite capability cache."""
        return self.cache_dir / "capabilities.sqlite"
