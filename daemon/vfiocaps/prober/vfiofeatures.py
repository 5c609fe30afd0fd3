"""Read a VFIO device's migration features from the kernel and print them as JSON (stdlib only).

vfiocapsd asks it (:func:`answer`) in a child forked for each probe that has become the probe
user, while the probe holds the group node granted (see ``kernelfacts.py``). Run by hand it is a
program of its own (``python -I -S vfiofeatures.py --container /dev/vfio/vfio --group
/dev/vfio/N --device NAME``), which is how the lab reads a device's features. It opens the
device the way QEMU does with the legacy (type1) container: ``VFIO_GROUP_SET_CONTAINER``,
``VFIO_SET_IOMMU``, ``VFIO_GROUP_GET_DEVICE_FD`` with the mdev UUID or the PCI address; then
asks ``VFIO_DEVICE_FEATURE`` ``GET|MIGRATION`` (the migration flags) and ``PROBE|SET|
DMA_LOGGING_START`` (device dirty tracking), exactly the questions QEMU asks at realize.

The answer is one JSON object (on stdout, or on the descriptor ``--answer-fd N``; exit status 0
whenever an answer was printed):
``{"observable": true, "migration": true, "flags": ["stop-copy", "p2p", "pre-copy"],
"raw_flags": 7, "dirty_tracking": true}`` or ``{"observable": false, "reason": "..."}`` when
the kernel or the vendor driver does not let this process open the device (Intel GVT-g needs
a KVM association, NVIDIA's manager reads QEMU's command line).

The ioctl numbers and layouts follow the kernel's ``include/uapi/linux/vfio.h``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys

# The reader runs once per probe: it imports no more than the ioctls need (typing, json and re
# would double its start). mypy takes this branch; the interpreter never does.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Ioctl = Callable[..., Any]

# <asm-generic/ioctl.h>: _IOC(dir, type, nr, size); VFIO uses _IO (dir 0, size 0) throughout.
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30


def _io(kind: int, number: int) -> int:
    """``_IO(type, nr)``."""
    return (
        (0 << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (number << _IOC_NRSHIFT)
        | (0 << _IOC_SIZESHIFT)
    )


VFIO_TYPE = ord(";")
VFIO_BASE = 100
VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3

VFIO_GET_API_VERSION = _io(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _io(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _io(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _io(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _io(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_GET_DEVICE_FD = _io(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_FEATURE = _io(VFIO_TYPE, VFIO_BASE + 17)

VFIO_GROUP_FLAGS_VIABLE = 1 << 0

VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6

MIGRATION_FLAGS = (
    (1 << 0, "stop-copy"),  # VFIO_MIGRATION_STOP_COPY
    (1 << 1, "p2p"),  # VFIO_MIGRATION_P2P
    (1 << 2, "pre-copy"),  # VFIO_MIGRATION_PRE_COPY (Linux 6.2)
)

# struct vfio_group_status { __u32 argsz; __u32 flags; }
GROUP_STATUS = struct.Struct("=II")
# struct vfio_device_feature { __u32 argsz; __u32 flags; __u8 data[]; }
FEATURE_HEADER = struct.Struct("=II")
# struct vfio_device_feature_migration { __aligned_u64 flags; }
FEATURE_MIGRATION = struct.Struct("=Q")

PR_SET_NO_NEW_PRIVS = 38


class NotObservable(Exception):
    """The device cannot be opened by this process: the reason is the answer."""


def group_status_request() -> bytearray:
    """The ``VFIO_GROUP_GET_STATUS`` argument."""
    return bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))


def migration_request() -> bytearray:
    """``VFIO_DEVICE_FEATURE`` with ``GET | MIGRATION`` and room for the flags."""
    size = FEATURE_HEADER.size + FEATURE_MIGRATION.size
    flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION
    return bytearray(FEATURE_HEADER.pack(size, flags) + FEATURE_MIGRATION.pack(0))


def dma_logging_probe_request() -> bytearray:
    """``VFIO_DEVICE_FEATURE`` with ``PROBE | SET | DMA_LOGGING_START`` (no data needed)."""
    flags = (
        VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START
    )
    return bytearray(FEATURE_HEADER.pack(FEATURE_HEADER.size, flags))


def decode_migration_flags(reply: bytes) -> tuple[int, list[str]]:
    """The raw and named migration flags in a ``GET | MIGRATION`` reply."""
    (raw,) = FEATURE_MIGRATION.unpack_from(reply, FEATURE_HEADER.size)
    return raw, [name for bit, name in MIGRATION_FLAGS if raw & bit]


def read_features(
    container_path: str,
    group_path: str,
    device: str,
    *,
    ioctl: Ioctl = fcntl.ioctl,
    opener: Callable[[str, int], int] = os.open,
    closer: Callable[[int], None] = os.close,
) -> dict[str, Any]:
    """Open *device* through its group and a type1 container and read its features.

    Raises :class:`NotObservable` when the container, the group or the device cannot be
    opened or set up; the message says which step failed and why.
    """
    opened: list[int] = []
    try:
        container = _open(opener, container_path, "the VFIO container", opened)
        version = ioctl(container, VFIO_GET_API_VERSION, 0)
        if version != VFIO_API_VERSION:
            raise NotObservable(f"unknown VFIO API version {version}")
        group = _open(opener, group_path, "the IOMMU group", opened)
        status = group_status_request()
        _call(ioctl, group, VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
        _, group_flags = GROUP_STATUS.unpack(bytes(status))
        if not group_flags & VFIO_GROUP_FLAGS_VIABLE:
            raise NotObservable(
                "the IOMMU group is not viable (a device in it is not bound to VFIO)"
            )
        fd_arg = bytearray(struct.pack("=i", container))
        _call(ioctl, group, VFIO_GROUP_SET_CONTAINER, fd_arg, "VFIO_GROUP_SET_CONTAINER")
        iommu = VFIO_TYPE1v2_IOMMU
        if not _call(ioctl, container, VFIO_CHECK_EXTENSION, iommu, "VFIO_CHECK_EXTENSION"):
            iommu = VFIO_TYPE1_IOMMU
        _call(ioctl, container, VFIO_SET_IOMMU, iommu, "VFIO_SET_IOMMU")
        name = bytearray(device.encode() + b"\0")
        device_fd = _call(ioctl, group, VFIO_GROUP_GET_DEVICE_FD, name, "VFIO_GROUP_GET_DEVICE_FD")
        opened.append(device_fd)
        return _features(ioctl, device_fd)
    finally:
        for fd in reversed(opened):
            closer(fd)


def _features(ioctl: Ioctl, device_fd: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"observable": True}
    request = migration_request()
    try:
        ioctl(device_fd, VFIO_DEVICE_FEATURE, request, True)
    except OSError as err:
        if err.errno != errno.ENOTTY:
            raise NotObservable(f"VFIO_DEVICE_FEATURE(MIGRATION): {err.strerror}") from err
        answer.update(migration=False, flags=[], raw_flags=0)
    else:
        raw, names = decode_migration_flags(bytes(request))
        answer.update(migration=True, flags=names, raw_flags=raw)
    try:
        ioctl(device_fd, VFIO_DEVICE_FEATURE, dma_logging_probe_request(), True)
    except OSError as err:
        if err.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            raise NotObservable(f"VFIO_DEVICE_FEATURE(DMA_LOGGING_START): {err.strerror}") from err
        answer["dirty_tracking"] = False
    else:
        answer["dirty_tracking"] = True
    return answer


def _open(opener: Callable[[str, int], int], path: str, what: str, opened: list[int]) -> int:
    try:
        fd = opener(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise NotObservable(f"cannot open {what} {path}: {err.strerror}") from err
    opened.append(fd)
    return fd


def _call(ioctl: Ioctl, fd: int, request: int, arg: Any, name: str) -> int:
    try:
        result = (
            ioctl(fd, request, arg, True) if isinstance(arg, bytearray) else ioctl(fd, request, arg)
        )
    except OSError as err:
        raise NotObservable(f"{name}: {err.strerror}") from err
    return int(result)


def _no_new_privs() -> None:
    """Make sure nothing this process could execute gains privileges (also set by vfiocapsd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _json_string(text: str) -> str:
    """*text* as a JSON string: quote, backslash and control characters escaped."""
    escaped = "".join(
        f"\\u{ord(char):04x}" if char < " " or char in '"\\' else char for char in text
    )
    return f'"{escaped}"'


def to_json(value: object) -> str:
    """The answer as JSON: ``json.dumps`` for the types an answer holds (dict of str to bool,
    int, str or list of str), without importing json."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(to_json(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_json_string(str(key))}: {to_json(item)}" for key, item in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not part of an answer: {value!r}")


def answer(container_path: str, group_path: str, device: str) -> str:
    """The reader's answer for *device* as one JSON line (see the module's description); a
    device that cannot be opened or asked is an answer too ("not observable", with the reason).
    Raises nothing but what the interpreter raises (e.g. ``MemoryError``)."""
    try:
        features = read_features(container_path, group_path, device)
    except NotObservable as err:
        features = {"observable": False, "reason": str(err)}
    except OSError as err:
        features = {"observable": False, "reason": f"{device}: {err.strerror or err}"}
    return to_json(features) + "\n"


USAGE = "usage: vfiofeatures.py --container PATH --group PATH --device NAME [--answer-fd N]"


def parse_arguments(argv: list[str]) -> dict[str, str]:
    """``--container``, ``--group``, ``--device`` and optionally ``--answer-fd``, each once
    (argparse costs 30 ms here).

    Raises ``ValueError`` with the usage line for anything else.
    """
    required = {"--container", "--group", "--device"}
    names = argv[0::2]
    if (
        len(argv) % 2
        or len(names) != len(set(names))
        or not required <= set(names) <= required | {"--answer-fd"}
    ):
        raise ValueError(USAGE)
    args = {name[2:]: value for name, value in zip(names, argv[1::2], strict=True)}
    if not args.get("answer-fd", "1").isdigit():
        raise ValueError(USAGE)
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the device's features as JSON; status 0 with an answer, 2 on bad arguments."""
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        sys.stderr.write(f"{err}\n")
        return 2
    _no_new_privs()
    text = answer(args["container"], args["group"], args["device"])
    if "answer-fd" in args:
        with os.fdopen(int(args["answer-fd"]), "w") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
