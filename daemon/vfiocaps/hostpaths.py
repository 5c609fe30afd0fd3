"""The host's system paths, as defaults: every part takes its paths from its caller or Config."""

from __future__ import annotations

from pathlib import Path

# The kernel's views of the host.
SYSFS_ROOT = Path("/sys")
DEV_ROOT = Path("/dev")
PROC_ROOT = Path("/proc")
MODULES_ROOT = Path("/lib/modules")
BOOT_ID_PATH = PROC_ROOT / "sys/kernel/random/boot_id"
# udev's control socket: present while udev runs.
UDEV_CONTROL = Path("/run/udev/control")
# Where binaries are looked for when PATH names none.
BINARY_DIR = Path("/usr/bin")

# The daemon's own directories, where systemd names none.
CACHE_DIR = Path("/var/cache/vfiocaps")
RUNTIME_DIR = Path("/run/vfiocaps")
