"""Asking a QEMU binary who it is: its version banner, and its vfio-pci properties apart."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from ..errors import ProbeError
from ..process import Credentials, ProcessStartError, minimal_environment, run_command
from ..qemubinary import QemuBinary

VERSION_RE = re.compile(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)")
PROPERTY_RE = re.compile(r"^\s+([A-Za-z][\w.-]*)=<", re.MULTILINE)
IDENTITY_TIMEOUT = 10.0


class QemuMissingError(ProbeError):
    """The configured QEMU binary does not exist or cannot be executed."""


class QemuUnusableError(ProbeError):
    """The QEMU binary runs but does not identify itself as a QEMU system emulator."""


def parse_version(output: str) -> str:
    """The version from ``qemu-system-* -version`` output.

    Raises :class:`QemuUnusableError` when *output* does not contain one.
    """
    found = VERSION_RE.search(output)
    if found is None:
        raise QemuUnusableError(f"not a QEMU version banner: {output.strip()[:200]!r}")
    return found.group(1)


def parse_device_properties(output: str) -> frozenset[str]:
    """Property names from ``-device DRIVER,help`` output. Raises nothing."""
    return frozenset(PROPERTY_RE.findall(output))


def binary_stat(binary: Path) -> tuple[Path, os.stat_result]:
    """Resolve *binary* and stat it. Raises :class:`QemuMissingError`."""
    try:
        resolved = binary.resolve(strict=True)
        st = resolved.stat()
    except OSError as err:
        raise QemuMissingError(f"QEMU binary {binary}: {err.strerror}") from err
    if not os.access(resolved, os.X_OK):
        raise QemuMissingError(f"QEMU binary {resolved} is not executable")
    return resolved, st


async def read_version(binary: Path, credentials: Credentials | None) -> str:
    """Ask *binary* for its version (run as *credentials*): one short QEMU start, all the daemon
    needs before it serves (its cache is keyed by the version).

    Raises :class:`QemuMissingError` when it cannot be executed and
    :class:`QemuUnusableError` when it does not answer like QEMU.
    """
    resolved, _ = binary_stat(binary)
    try:
        banner = await run_command(
            [str(resolved), "-version"],
            time_limit=IDENTITY_TIMEOUT,
            env=minimal_environment(),
            credentials=credentials,
        )
    except ProcessStartError as err:
        raise QemuMissingError(str(err)) from err
    except TimeoutError as err:
        raise QemuUnusableError(f"{resolved} did not answer within {IDENTITY_TIMEOUT}s") from err
    if banner.returncode != 0:
        raise QemuUnusableError(
            f"{resolved} -version exited with {banner.returncode}: {banner.stderr.strip()[:200]}"
        )
    return parse_version(banner.stdout)


async def read_identity(binary: Path, credentials: Credentials | None) -> QemuBinary:
    """Who *binary* is, as far as serving needs (one ``-version`` start, run as *credentials*):
    the version, and the change time and size of the file it resolves to, named as given. The
    ``vfio-pci`` properties are left unasked (see :func:`read_properties`).

    Raises:
        QemuMissingError: it cannot be executed.
        QemuUnusableError: it does not answer like QEMU.
    """
    _, st = binary_stat(binary)
    version = await read_version(binary, credentials)
    return QemuBinary(path=str(binary), version=version, ctime_ns=st.st_ctime_ns, size=st.st_size)


async def read_properties(qemu: QemuBinary, credentials: Credentials | None) -> QemuBinary:
    """*qemu* with the ``vfio-pci`` properties its file has now (one short start, run as
    *credentials*), and the change time and size of that file: a caller that finds them
    changed knows the answer may belong to another binary.

    Raises:
        QemuMissingError: it cannot be executed.
        QemuUnusableError: it does not answer within the time limit.
    """
    resolved, st = binary_stat(Path(qemu.path))
    try:
        device_help = await run_command(
            [str(resolved), "-nodefaults", "-machine", "none", "-device", "vfio-pci,help"],
            time_limit=IDENTITY_TIMEOUT,
            env=minimal_environment(),
            credentials=credentials,
        )
    except ProcessStartError as err:
        raise QemuMissingError(str(err)) from err
    except TimeoutError as err:
        raise QemuUnusableError(f"{resolved} did not answer within {IDENTITY_TIMEOUT}s") from err
    return replace(
        qemu,
        ctime_ns=st.st_ctime_ns,
        size=st.st_size,
        vfio_pci_properties=parse_device_properties(device_help.stdout + device_help.stderr),
    )
