"""The kernel's migration facts for a device, read by the VFIO feature reader as the probe user."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from ..process import (
    Credentials,
    ManagedProcess,
    ProcessSpec,
    ProcessStartError,
    minimal_environment,
)
from . import vfiofeatures
from .migration import KernelMigrationFacts

log = logging.getLogger("vfiocaps.prober")

READER_TIME_LIMIT = 10.0
ANSWER_LIMIT = 4096  # bytes of the reader's answer read; its JSON is about 120
KNOWN_FLAGS = frozenset(name for _, name in vfiofeatures.MIGRATION_FLAGS)


def reader_argv(
    container: Path, group: Path, device: str, answer_fd: int | None = None
) -> tuple[str, ...]:
    """The reader's command line: the daemon's interpreter, isolated (no environment, no site)."""
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

    Whatever stops the answer (the reader cannot start, times out, the vendor driver refuses
    the open) gives facts that are not observable, with the reason. The reader runs in its own
    process group, killed at the time limit or on cancellation; its answer comes through a
    pipe of which at most ``ANSWER_LIMIT`` bytes are read.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        argv = reader_argv(dev_root / "vfio" / "vfio", group, device, write_end)
        spec = ProcessSpec(
            argv=argv, env=minimal_environment(), pass_fds=(write_end,), credentials=credentials
        )
        try:
            async with ManagedProcess(spec) as process:
                os.close(write_end)
                write_end = -1
                async with asyncio.timeout(READER_TIME_LIMIT):
                    result = await process.wait()
        except ProcessStartError as err:
            return KernelMigrationFacts(
                False, reason=f"the VFIO feature reader did not start: {err}"
            )
        except TimeoutError:
            return KernelMigrationFacts(
                False, reason=f"the VFIO feature reader gave no answer in {READER_TIME_LIMIT:.0f} s"
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
    if result.returncode != 0 and facts.observable:
        facts = KernelMigrationFacts(False, reason=f"the reader exited with {result.returncode}")
    if not facts.observable:
        log.debug("kernel migration facts of %s not observable: %s", device, facts.reason)
    return facts


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
