"""Guest-side lab helpers: the daemon over the system bus (busctl), sample mdev drivers in sysfs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUS_NAME = "org.vfiocaps"
ROOT_PATH = "/org/vfiocaps"
MANAGER = "org.vfiocaps1.Manager"
DEVICE = "org.vfiocaps1.Device"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
SYSFS = Path("/sys")
SETTLED_STATES = frozenset({"done", "failed", "busy"})
SAMPLE_DRIVERS = ("mtty", "mdpy", "mbochs")
# The types every run instantiates; mdpy-xga is kept unprobed for the busy-device test.
SAMPLE_TYPES = {
    "mtty": ("mtty-1", "mtty-2"),
    "mdpy": ("mdpy-vga", "mdpy-hd"),
    "mbochs": ("mbochs-small", "mbochs-medium"),
}
# What the daemon must publish for each sample (observed with QEMU 10 on kernel 6.12): mtty
# migrates only with its device options (QEMU's defaults fail at the save); the others not at all.
# GlHost is the answer on a host without a DRM render node (the GL test loads vgem later).
EXPECTED = {
    "mtty": {
        "Display": "none",
        "GlRequired": False,
        "Migration": "unsupported",
        "MigrationWithOptions": "supported",
        "GlHost": "not-needed",
    },
    "mdpy": {
        "Display": "region",
        "GlRequired": False,
        "Migration": "unsupported",
        "MigrationWithOptions": "unsupported",
        "GlHost": "not-needed",
    },
    "mbochs": {
        "Display": "dmabuf",
        "GlRequired": True,
        "Migration": "unsupported",
        "MigrationWithOptions": "unsupported",
        "GlHost": "no-render-node",
    },
}
# What QEMU 10 says when it saves an mtty VM started with its defaults.
DEFAULTS_SAVE_ERROR = "ram_save_setup failed: Operation not supported"
# The device options mtty needs to migrate (string values, QEMU's OnOffAuto).
MTTY_OPTIONS = [["x-device-dirty-page-tracking", "off"], ["enable-migration", "on"]]
# The device state mtty saves: a header plus its ports' registers (mtty.c), per type.
MTTY_STATE_BYTES = {"mtty-1": 60, "mtty-2": 96}
# Where the lab image keeps the sample drivers' C sources the modules were built from.
SAMPLE_SOURCES = Path("/usr/lib/vfiocaps-lab/source")
_SOURCE_FLAGS = {
    "VFIO_MIGRATION_STOP_COPY": "stop-copy",
    "VFIO_MIGRATION_P2P": "p2p",
    "VFIO_MIGRATION_PRE_COPY": "pre-copy",
}


@dataclass(frozen=True)
class DriverMigration:
    """What a sample driver's source declares to the VFIO core about migration."""

    flags: frozenset[str]  # the names of the VFIO_MIGRATION_* flags it sets
    dirty_tracking: bool  # it gives the core DMA logging operations (log_ops)


def driver_source_migration(module: str) -> DriverMigration:
    """The migration flags and DMA logging a sample driver's C source sets up."""
    text = (SAMPLE_SOURCES / f"{module}.c").read_text()
    found = re.search(r"\bmigration_flags\s*=\s*([^;]+);", text)
    flags = set()
    if found:
        for word in re.findall(r"VFIO_MIGRATION_\w+", found.group(1)):
            assert word in _SOURCE_FLAGS, f"{module}.c sets {word}, unknown to the lab"
            flags.add(_SOURCE_FLAGS[word])
    return DriverMigration(frozenset(flags), re.search(r"\blog_ops\s*=", text) is not None)


def kernel_config(names: tuple[str, ...]) -> dict[str, str]:
    """``CONFIG_X`` values of the running kernel's config (``n`` when not set)."""
    path = Path("/boot") / f"config-{os.uname().release}"
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key in names:
            values[key] = value
    return {name: values.get(name, "n") for name in names}


@dataclass
class CapabilityTable:
    """Rows of what the daemon and the prober answered, written to the results share."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, type_id: str, **values: Any) -> None:
        """Add or extend the row of a device type."""
        self.rows.setdefault(type_id, {"type": type_id}).update(values)

    def markdown(self) -> str:
        """The table as GitHub markdown."""
        columns = [
            ("driver", "driver"),
            ("version", "driver version"),
            ("type", "type"),
            ("name", "name"),
            ("display", "display"),
            ("gl", "GL"),
            ("gl_host", "GL host"),
            ("migration", "migration (QEMU's defaults)"),
            ("migration_with_options", "with options"),
            ("state_bytes", "state bytes"),
            ("save_load", "save / load s"),
            ("flags", "kernel flags"),
            ("conditions", "conditions"),
            ("notes", "notes / blockers"),
            ("cache_hit", "2nd instance from cache"),
            ("prober", "vfiocapsctl probe"),
        ]
        lines = [
            "| " + " | ".join(title for _, title in columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|",
        ]
        for type_id in sorted(self.rows):
            row = self.rows[type_id]
            cells = [str(row.get(key, "")).replace("|", "/") for key, _ in columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


# Everything inside the lab guest runs under emulation: be generous.
PROBE_TIMEOUT = 180.0
# Once one probe wait has run out, later waits are short: a daemon that never answers fails the
# suite in minutes, not hours.
PROBE_TIMEOUT_AFTER_A_MISS = 20.0


@dataclass
class Patience:
    """How long the next wait for a probe may take."""

    missed: bool = False

    def timeout(self) -> float:
        """The current wait limit in seconds."""
        return PROBE_TIMEOUT_AFTER_A_MISS if self.missed else PROBE_TIMEOUT


PATIENCE = Patience()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll *predicate* until it returns something truthy; return that, or fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def unwrap(value: Any) -> Any:
    """Turn busctl's JSON variants ({"type": ..., "data": ...}) into plain values."""
    if isinstance(value, dict) and set(value) == {"type", "data"}:
        return unwrap(value["data"])
    if isinstance(value, dict):
        return {key: unwrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unwrap(item) for item in value]
    return value


class BusCallError(AssertionError):
    """A D-Bus call through busctl returned an error."""


def busctl(*args: str, timeout: float = 120) -> Any:
    """Run ``busctl --system --json=short ARGS``; return its decoded ``data`` (or None)."""
    result = subprocess.run(
        ["busctl", "--system", "--json=short", f"--timeout={int(timeout)}", *args],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
    if result.returncode != 0:
        raise BusCallError(f"busctl {' '.join(args)}: {result.stderr.strip()}")
    out = result.stdout.strip()
    if not out:
        return None
    return json.loads(out)["data"]


@dataclass(frozen=True)
class Daemon:
    """The installed vfiocapsd, seen over the system bus."""

    service: str

    def call(self, path: str, interface: str, method: str, signature: str = "", *args: str) -> Any:
        """Call a method; return its out-arguments as a list of plain values."""
        sig = [signature, *args] if signature else []
        return unwrap(busctl("call", BUS_NAME, path, interface, method, *sig))

    def manager(self, method: str, signature: str = "", *args: str) -> Any:
        """Call a Manager method; return its single out-argument."""
        return self.call(ROOT_PATH, MANAGER, method, signature, *args)[0]

    def refresh_outcome(self, path: str) -> dict[str, Any] | str:
        """Device.Refresh(): its reply, or the error message when the daemon refuses."""
        try:
            return dict(self.call(path, DEVICE, "Refresh")[0])
        except BusCallError as err:
            return str(err)

    def prop(self, name: str, path: str = ROOT_PATH, interface: str = MANAGER) -> Any:
        """Read one property."""
        return unwrap(busctl("get-property", BUS_NAME, path, interface, name))

    def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """GetManagedObjects, as {path: {interface: {property: value}}}."""
        reply = self.call(ROOT_PATH, OBJECT_MANAGER, "GetManagedObjects")
        return dict(reply[0])

    def devices(self) -> dict[str, dict[str, Any]]:
        """Every published device: {path: Device properties}."""
        return {
            path: interfaces[DEVICE]
            for path, interfaces in self.objects().items()
            if DEVICE in interfaces
        }

    def device_by_uuid(self, mdev_uuid: str) -> tuple[str, dict[str, Any]] | None:
        """The published device whose Uuid is *mdev_uuid*, as (path, properties)."""
        for path, props in self.devices().items():
            if str(props.get("Uuid", "")).lower() == mdev_uuid.lower():
                return path, props
        return None

    def wait_settled(self, mdev_uuid: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the device is published and its ProbeState is done, failed or busy."""

        def settled() -> dict[str, Any] | None:
            found = self.device_by_uuid(mdev_uuid)
            if found and found[1].get("ProbeState") in SETTLED_STATES:
                return found[1]
            return None

        limit = PATIENCE.timeout() if timeout is None else timeout
        try:
            return dict(wait_for(settled, limit, f"device {mdev_uuid} to be probed", 1.0))
        except AssertionError:
            PATIENCE.missed = True
            raise

    def is_serving(self) -> bool:
        """The daemon owns its name on the system bus."""
        try:
            return bool(
                busctl(
                    "call",
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "NameHasOwner",
                    "s",
                    BUS_NAME,
                )[0]
            )
        except BusCallError:
            return False

    def has_failed(self) -> bool:
        """The daemon's unit is in the failed state."""
        command = ["systemctl", "-q", "is-failed", self.service]
        return subprocess.run(command, check=False).returncode == 0

    def systemctl(self, verb: str) -> None:
        """Start, stop or restart the daemon's unit."""
        subprocess.run(["systemctl", verb, self.service], check=True, timeout=120)

    def restart(self) -> None:
        """Restart the service and wait until it serves again."""
        self.systemctl("restart")
        wait_for(self.is_serving, 120, "vfiocapsd to serve again")

    def journal(self, lines: int = 80) -> str:
        """The last lines of the daemon's journal (for failure messages)."""
        return subprocess.run(
            ["journalctl", "--no-pager", "-n", str(lines), "-u", self.service],
            capture_output=True,
            text=True,
            check=False,
        ).stdout


class SignalWatch:
    """``busctl monitor`` on org.vfiocaps, collecting the signals it emits."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._process = subprocess.Popen(
            ["busctl", "--system", "--json=short", "monitor", BUS_NAME],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self.messages.append(json.loads(line))

    def signals(self, member: str) -> list[list[Any]]:
        """Bodies of the signals named *member* seen so far."""
        return [
            unwrap(message.get("payload", {}).get("data", []))
            for message in list(self.messages)
            if message.get("type") == "signal" and message.get("member") == member
        ]

    def close(self) -> None:
        """Stop monitoring."""
        self._process.terminate()
        self._process.wait(10)


@dataclass
class MdevLab:
    """The kernel's sample mdev drivers and their instances in the real sysfs."""

    created: list[str] = field(default_factory=list)

    @staticmethod
    def load(module: str) -> None:
        """``modprobe`` a sample driver."""
        subprocess.run(["modprobe", module], check=True, timeout=60)

    @staticmethod
    def parent_dir(module: str) -> Path:
        """The parent device of a sample (its class name is the module name)."""
        return (SYSFS / "class" / "mdev_bus" / module).resolve()

    def types(self, module: str) -> dict[str, str]:
        """{type id: human name} of a loaded sample driver."""
        base = self.parent_dir(module) / "mdev_supported_types"
        return {
            entry.name: (entry / "name").read_text().strip()
            for entry in sorted(base.iterdir())
            if (entry / "create").exists()
        }

    def create(self, module: str, type_id: str) -> str:
        """Create an instance of *type_id*; return its UUID."""
        mdev_uuid = str(uuid.uuid4())
        create = self.parent_dir(module) / "mdev_supported_types" / type_id / "create"
        create.write_text(mdev_uuid)
        wait_for((SYSFS / "bus/mdev/devices" / mdev_uuid).exists, 30, f"mdev {mdev_uuid}")
        self.created.append(mdev_uuid)
        return mdev_uuid

    def remove(self, mdev_uuid: str) -> None:
        """Remove an instance."""
        device = SYSFS / "bus/mdev/devices" / mdev_uuid
        (device / "remove").write_text("1")
        wait_for(lambda: not device.exists(), 30, f"mdev {mdev_uuid} to go")
        if mdev_uuid in self.created:
            self.created.remove(mdev_uuid)

    def instances_of(self, module: str) -> list[str]:
        """UUIDs of every instance whose parent is *module*'s device."""
        parent = self.parent_dir(module)
        return [
            entry.name
            for entry in (SYSFS / "bus/mdev/devices").iterdir()
            if entry.resolve().parent == parent
        ]

    @staticmethod
    def type_of(mdev_uuid: str) -> str:
        """The type id of an instance (its mdev_type link)."""
        return (SYSFS / "bus/mdev/devices" / mdev_uuid / "mdev_type").resolve().name

    @staticmethod
    def group_of(mdev_uuid: str) -> str:
        """The IOMMU group number of an instance."""
        return (SYSFS / "bus/mdev/devices" / mdev_uuid / "iommu_group").resolve().name

    @staticmethod
    def module_version(module: str) -> str:
        """``/sys/module/<m>/version`` or empty when the module declares none."""
        path = SYSFS / "module" / module / "version"
        return path.read_text().strip() if path.exists() else ""


def kernel_release() -> str:
    """``uname -r``."""
    return os.uname().release


def installed_module_path(module: str) -> Path:
    """Where the lab image installed a sample module for modprobe."""
    return Path("/lib/modules") / kernel_release() / "updates" / "vfiocaps-lab" / f"{module}.ko"


def lab_module_variant(variant: str, module: str) -> Path:
    """A sample module build kept aside by the lab image (``base`` or ``update``)."""
    return Path("/usr/lib/vfiocaps-lab/modules") / variant / f"{module}.ko"


def vfiocapsctl() -> str:
    """The installed command-line client."""
    found = shutil.which("vfiocapsctl")
    return found or "/usr/bin/vfiocapsctl"


class Qmp:
    """A minimal synchronous QMP client over a UNIX socket."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        self._read()
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            message = json.loads(line)
            if "event" not in message:
                return dict(message)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command; return its ``return`` value or raise on ``error``."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self._sock.close()


@contextlib.contextmanager
def qemu_vm(
    mdev_uuid: str, workdir: Path, device_options: str = "display=off", extra: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], Qmp]]:
    """A paused QEMU of our own with the mdev as device ``held``, and its QMP connection."""
    workdir.mkdir(parents=True, exist_ok=True)
    qmp_path = workdir / "vm.qmp"
    qmp_path.unlink(missing_ok=True)
    log = (workdir / "vm.log").open("wb")
    process = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35,accel=kvm:tcg",
            "-m",
            "128",
            "-device",
            f"vfio-pci,sysfsdev=/sys/bus/mdev/devices/{mdev_uuid},{device_options},id=held",
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    qmp: Qmp | None = None
    try:

        def connected() -> Qmp | None:
            if process.poll() is not None:
                raise AssertionError(f"the VM exited: {(workdir / 'vm.log').read_text()}")
            try:
                return Qmp(qmp_path)
            except OSError:
                return None

        qmp = wait_for(connected, 120, "the VM's QMP socket")
        assert qmp is not None
        yield process, qmp
    finally:
        if qmp is not None:
            with contextlib.suppress(OSError, RuntimeError, ConnectionError):
                qmp.execute("quit")
            qmp.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def running_vm(
    mdev_uuid: str, workdir: Path
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[bytes], Qmp]]:
    """A QEMU of our own holding the mdev open (paused, like a VM being set up)."""
    return qemu_vm(mdev_uuid, workdir)


def migration_finished(qmp: Qmp, timeout: float = 120) -> dict[str, Any]:
    """Wait until ``query-migrate`` says completed or failed; return its answer."""

    def finished() -> dict[str, Any] | None:
        answer = dict(qmp.execute("query-migrate"))
        return answer if answer.get("status") in ("completed", "failed", "cancelled") else None

    return dict(wait_for(finished, timeout, "the migration to finish", 0.2))


# The Debian package's own module directory: vfiocaps and the dependencies it carries.
PACKAGE_MODULES = "/usr/share/vfiocaps"


def installed_python() -> str:
    """The interpreter the package's launchers run (their ``#!`` line), as the daemon uses."""
    first = Path("/usr/bin/vfiocapsd").read_text().split("\n", 1)[0]
    return first.removeprefix("#!").split()[0]


def read_vfio_features(mdev_uuid: str) -> dict[str, Any]:
    """The installed VFIO feature reader run by hand (as root), the way vfiocapsd runs it."""
    python = installed_python()
    find = (
        f"import sys; sys.path.insert(0, {PACKAGE_MODULES!r}); "
        "import vfiocaps.prober.vfiofeatures as m; print(m.__file__)"
    )
    where = subprocess.run(
        [python, "-I", "-c", find],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    group = MdevLab.group_of(mdev_uuid)
    result = subprocess.run(
        [
            python,
            "-I",
            "-S",
            where,
            "--container",
            "/dev/vfio/vfio",
            "--group",
            f"/dev/vfio/{group}",
            "--device",
            mdev_uuid,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result
    return dict(json.loads(result.stdout))
