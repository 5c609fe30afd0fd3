"""The kernel's migration facts for a device, read by the VFIO feature reader as the probe user."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from ..forked import reaped_in_time
from ..process import Credentials
from . import vfiofeatures
from .migration import KernelMigrationFacts

log = logging.getLogger("vfiocaps.prober")

READER_TIME_LIMIT = 10.0
ANSWER_LIMIT = 4096  # bytes of the reader's answer read; its JSON is about 120
KNOWN_FLAGS = frozenset(name for _, name in vfiofeatures.MIGRATION_FLAGS)


def reader_argv(
    container: Path, group: Path, device: str, answer_fd: int | None = None
) -> tuple[str, ...]:
    """The reader as a program of its own, run by hand (the lab runs it so): the daemon's
    interpreter, isolated (no environment, no site)."""
    answer = ("--answer-fd", str(answer_fd)) if answer_fd is not None else ()
    return (
        sys.executable,
        "-I",
        "-S",
        str(Path(vfiofeatures.__file__)),
        "--container",
        str(container),
        "--group",
        str(group),
        "--device",
        device,
        *answer,
    )


async def read_kernel_facts(
    dev_root: Path, group: Path, device: str, credentials: Credentials | None
) -> KernelMigrationFacts:
    """Ask the kernel about *device* through *group*, as the probe user; never raises.

    The reader is a child forked from the daemon, not a new interpreter (a Python start per
    probe costs more than everything else the probe does beside QEMU): it leaves the daemon's
    session and every descriptor but its answer pipe, becomes the probe user (*credentials*;
    the change of user also makes it undumpable, so that no other process of the probe user can
    trace it) and only then opens the device and asks the ioctls (:mod:`.vfiofeatures`). Whatever
    stops the answer (the child cannot start, times out, the vendor driver refuses the open)
    gives facts that are not observable, with the reason. The child is killed at the time limit
    or on cancellation and always reaped; at most ``ANSWER_LIMIT`` bytes of its answer are read.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            pid = os.fork()
        except OSError as err:
            return KernelMigrationFacts(
                False, reason=f"the VFIO feature reader did not start: {err.strerror}"
            )
        if pid == 0:  # pragma: no cover - the child; its answer is what the tests check
            _answer_and_exit(write_end, dev_root / "vfio" / "vfio", group, device, credentials)
        os.close(write_end)
        write_end = -1
        try:
            status = await reaped_in_time(pid, READER_TIME_LIMIT)
        except OSError as err:
            return KernelMigrationFacts(
                False, reason=f"cannot wait for the VFIO feature reader: {err.strerror}"
            )
        if status is None:
            return KernelMigrationFacts(
                False, reason=f"the VFIO feature reader gave no answer in {READER_TIME_LIMIT:g} s"
            )
        # The reader has exited: what it wrote is in the pipe (a pipe holds 64 KiB), read once.
        os.set_blocking(read_end, False)
        try:
            answer = os.read(read_end, ANSWER_LIMIT)
        except BlockingIOError:
            answer = b""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    facts = parse_reader_output(answer.decode("utf-8", errors="replace"))
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0 and facts.observable:
        facts = KernelMigrationFacts(False, reason=f"the reader exited with {returncode}")
    if not facts.observable:
        log.debug("kernel migration facts of %s not observable: %s", device, facts.reason)
    return facts


def _answer_and_exit(
    answer_fd: int, container: Path, group: Path, device: str, credentials: Credentials | None
) -> NoReturn:
    """The forked reader: drop everything of the daemon, become the probe user, answer, exit.

    Runs in the child only and never returns: whatever happens ends in ``os._exit`` (status 0
    once the answer is written), so no code of the daemon runs on in this process.
    """
    status = 1
    try:
        os.setsid()  # out of the daemon's process group and session
        os.closerange(3, answer_fd)
        os.closerange(answer_fd + 1, os.sysconf("SC_OPEN_MAX"))
        if credentials is not None:
            os.setgroups(list(credentials.groups))
            os.setresgid(credentials.gid, credentials.gid, credentials.gid)
            os.setresuid(credentials.uid, credentials.uid, credentials.uid)
        text = vfiofeatures.answer(str(container), str(group), device)
        os.write(answer_fd, text.encode()[:ANSWER_LIMIT])
        status = 0
    finally:
        os._exit(status)


def parse_reader_output(text: str) -> KernelMigrationFacts:
    """The reader's JSON as facts; anything malformed is "not observable". Raises nothing."""
    try:
        answer = json.loads(text.strip().splitlines()[-1]) if text.strip() else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return KernelMigrationFacts(False, reason="the VFIO feature reader gave no answer")
    if answer.get("observable") is not True:
        reason = answer.get("reason")
        return KernelMigrationFacts(False, reason=str(reason) if reason else "not observable")
    flags = answer.get("flags", [])
    tracking = answer.get("dirty_tracking")
    if not isinstance(flags, list) or not all(flag in KNOWN_FLAGS for flag in flags):
        return KernelMigrationFacts(False, reason=f"unknown migration flags {flags!r}")
    return KernelMigrationFacts(
        True,
        flags=tuple(str(flag) for flag in flags),
        dirty_tracking=tracking if isinstance(tracking, bool) else None,
    )
