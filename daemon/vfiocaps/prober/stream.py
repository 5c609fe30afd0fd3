"""The migration stream of a probe: received into a bounded private file, sent back for the load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

STREAM_FILE = "migration-stream"
CHUNK = 1 << 16


@dataclass(frozen=True)
class StreamReceipt:
    """What :func:`receive_stream` got: the byte count, and whether it passed the limit."""

    total: int
    exceeded: bool


def stream_path(workdir: Path) -> Path:
    """Where a probe keeps its saved stream between the save and the load launches."""
    return workdir / STREAM_FILE


def remove_stream(workdir: Path) -> None:
    """Delete the probe's saved stream if there is one. Raises nothing for a missing file."""
    with contextlib.suppress(FileNotFoundError):
        stream_path(workdir).unlink()


async def receive_stream(sock: socket.socket, target: Path, limit: int) -> StreamReceipt:
    """Copy what *sock* receives into *target* (new, 0600) until EOF or past *limit* bytes.

    Past the limit the file is deleted, the socket shut down (QEMU's write then fails) and
    the receipt says ``exceeded``; nothing more is stored. Raises ``OSError`` when the file
    cannot be created or written (a planted file or symlink included: ``O_EXCL|O_NOFOLLOW``).
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    total = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while chunk := await loop.sock_recv(sock, CHUNK):
            total += len(chunk)
            if total > limit:
                os.close(fd)
                fd = -1
                os.unlink(target)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                return StreamReceipt(total, exceeded=True)
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
    except BaseException:
        if fd >= 0:
            os.close(fd)
            fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    return StreamReceipt(total, exceeded=False)


async def send_stream(sock: socket.socket, source: Path) -> int:
    """Send *source* over *sock*, then shut the sending side (EOF for QEMU); return the count.

    Raises ``OSError`` when the file cannot be read or the peer goes away.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    total = 0
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, CHUNK):
            await loop.sock_sendall(sock, chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    sock.shutdown(socket.SHUT_WR)
    return total
