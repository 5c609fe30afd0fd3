"""The GL launch's evidence: a ``screendump`` of the device's console into a file we pass QEMU."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import ExecuteError, QMPClient

SCREENDUMP_FILE = "screendump.ppm"
HEADER_BYTES = 64
# A binary PPM header (what QEMU's screendump writes by default): magic, width, height, maxval.
_PPM_HEADER = re.compile(rb"\AP6\s+(\d+)\s+(\d+)\s+(\d+)\s")


@dataclass(frozen=True)
class Screendump:
    """Whether ``screendump`` answered for the device, and the image size it wrote."""

    answered: bool
    width: int = 0
    height: int = 0
    error: str = ""

    def describe(self) -> str:
        """``a 640x480 image`` / ``an image`` / the error. Raises nothing."""
        if not self.answered:
            return self.error
        return f"a {self.width}x{self.height} image" if self.width else "an image"


def ppm_size(header: bytes) -> tuple[int, int] | None:
    """Width and height of a binary PPM *header*, or ``None``. Raises nothing."""
    found = _PPM_HEADER.match(header)
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2))


async def take_screendump(client: QMPClient, workdir: Path, device_id: str) -> Screendump:
    """Ask QEMU for a screendump of *device_id*'s console into a new file in *workdir*.

    QEMU runs as the probe user and cannot open files in the private directory: the file is
    created here (``O_EXCL|O_NOFOLLOW``, 0600), passed over the QMP socket into an fd set
    (``add-fd``) and named ``/dev/fdset/N``; the fd set is removed and the file deleted after.
    QEMU's refusal is the answer (``answered`` false, its error); a written file that is not a
    PPM image still counts as answered, without a size.

    Raises ``OSError`` when the file cannot be created, and the QMP client's errors when the
    session is lost (a crash).
    """
    path = workdir / SCREENDUMP_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            client.send_fd_scm(fd)
            added = await client.execute("add-fd")
        finally:
            os.close(fd)
        fdset = added.get("fdset-id") if isinstance(added, dict) else None
        if not isinstance(fdset, int):
            return Screendump(False, error=f"add-fd gave no fd set: {added!r}")
        refusal = ""
        try:
            await client.execute(
                "screendump", {"filename": f"/dev/fdset/{fdset}", "device": device_id}
            )
        except ExecuteError as err:
            refusal = f"screendump: {err.error.error.desc}"
        # Not in a ``finally``: a lost session or a cancellation must not wait on QEMU again
        # (the process is killed, and its descriptors with it).
        with contextlib.suppress(ExecuteError):
            await client.execute("remove-fd", {"fdset-id": fdset})
        if refusal:
            return Screendump(False, error=refusal)
        with path.open("rb") as image:
            size = ppm_size(image.read(HEADER_BYTES))
        return Screendump(True, *(size or (0, 0)))
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
