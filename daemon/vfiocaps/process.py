"""Child processes the house way: argv lists, minimal environment, own process group, reaped."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VfiocapsError

MINIMAL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
STDERR_LIMIT = 64 * 1024
STOP_GRACE_SECONDS = 2.0


class ProcessStartError(VfiocapsError):
    """The program could not be started at all (missing, not executable, bad credentials)."""


@dataclass(frozen=True)
class Credentials:
    """The user a child runs as, applied in the child before ``exec`` (setgroups/setgid/setuid)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class ProcessSpec:
    """Everything needed to start one child: nothing is inherited that is not listed here."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=lambda: minimal_environment())
    pass_fds: tuple[int, ...] = ()
    credentials: Credentials | None = None
    cwd: Path = Path("/")


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel *task* and wait until it has ended.

    The task's own cancellation is expected and ends here; a cancellation of the *calling*
    task that arrives meanwhile is re-raised, never swallowed. Raises whatever else the task
    raised.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def kill_process_group(pgid: int) -> None:
    """SIGKILL every process left in the group *pgid*. Raises nothing.

    Called also after the leader ended by itself: whatever it started (and left in its group)
    goes with it. The leader's pid is not handed to a new process while any member of its group
    lives; once none does, the group is empty, and the kernel hands pids out in increasing order,
    so right after the leader's reap the id still names no other group.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def minimal_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``PATH`` and a C locale, plus *extra*; nothing of the caller's environment leaks."""
    env = {"PATH": MINIMAL_PATH, "LC_ALL": "C"}
    env.update(extra or {})
    return env


class ProcessState(enum.Enum):
    """Life of a :class:`ManagedProcess`."""

    NEW = "new"
    RUNNING = "running"
    EXITED = "exited"  # ended on its own (status or signal)
    KILLED = "killed"  # ended because we killed its process group


@dataclass(frozen=True)
class ProcessResult:
    """How a child ended and what it said on stderr (its first and last ``STDERR_LIMIT / 2``
    bytes)."""

    returncode: int
    stderr: str
    duration: float
    killed_by_us: bool

    @property
    def signal(self) -> signal.Signals | None:
        """The signal that ended the child, if a signal did."""
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode)
        except ValueError:
            return None


class _ExitProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """The protocol of :class:`asyncio.subprocess.Process`, which also tells when the child
    ends: ``Process.wait()`` returns only once every pipe is closed as well."""

    def __init__(self, exited: asyncio.Event) -> None:
        super().__init__(limit=2**16, loop=asyncio.get_running_loop())
        self._exited_event = exited

    def process_exited(self) -> None:
        self._exited_event.set()
        super().process_exited()


class ManagedProcess:
    """One child in its own process group, with stderr collected and a guaranteed reap.

    Use as ``async with ManagedProcess(spec) as proc: ...``; leaving the block kills the whole
    process group if the child still runs and waits until it is reaped, also on cancellation.
    """

    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self.state = ProcessState.NEW
        self._process: asyncio.subprocess.Process | None = None
        self._stderr = bytearray()
        self._stderr_tail = bytearray()
        self._stderr_dropped = 0
        self._stderr_task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._ended: float | None = None
        self._exited = asyncio.Event()  # the child has ended (its pipes may still be open)
        self._transport: asyncio.SubprocessTransport | None = None

    def _started_process(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise ProcessStartError("the process has not been started")
        return self._process

    @property
    def pid(self) -> int:
        """The child's pid (which is also its process group id).

        Raises :class:`ProcessStartError` before :meth:`start`.
        """
        return self._started_process().pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has been reaped, else ``None``."""
        return None if self._process is None else self._process.returncode

    async def start(self) -> None:
        """Start the child in a new session (so it leads its own process group).

        Raises :class:`ProcessStartError` when it cannot be executed.
        """
        if self.state is not ProcessState.NEW:
            raise ProcessStartError("a managed process is started once")
        creds = self.spec.credentials
        self._started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _ExitProtocol(self._exited),
                *self.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=dict(self.spec.env),
                pass_fds=self.spec.pass_fds,
                close_fds=True,
                cwd=self.spec.cwd,
                start_new_session=True,
                user=creds.uid if creds else None,
                group=creds.gid if creds else None,
                extra_groups=list(creds.groups) if creds else None,
                umask=0o077,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            raise ProcessStartError(f"cannot start {self.spec.argv[0]}: {err}") from err
        self._transport = transport
        self._process = asyncio.subprocess.Process(transport, protocol, loop)
        self.state = ProcessState.RUNNING
        self._stderr_task = asyncio.create_task(self._collect_stderr())

    async def _collect_stderr(self) -> None:
        stream = self._started_process().stderr
        if stream is None:
            return
        half = STDERR_LIMIT // 2
        while chunk := await stream.read(4096):
            room = half - len(self._stderr)
            if room > 0:
                self._stderr += chunk[:room]
                chunk = chunk[room:]
            if chunk:
                self._stderr_tail += chunk
                excess = len(self._stderr_tail) - half
                if excess > 0:
                    self._stderr_dropped += excess
                    del self._stderr_tail[:excess]

    def stderr_text(self) -> str:
        """The first and the last ``STDERR_LIMIT / 2`` bytes the child wrote to stderr (decoded
        leniently), with a line saying how much was left out between them: a cause printed
        after a flood of noise is still seen."""
        text = self._stderr.decode("utf-8", errors="replace")
        if self._stderr_dropped:
            text += f"\n[{self._stderr_dropped} bytes of stderr left out]\n"
        return text + self._stderr_tail.decode("utf-8", errors="replace")

    async def wait(self) -> ProcessResult:
        """Wait until the child ends on its own; raises nothing (cancellation propagates).

        What it left in its process group is killed then, so that nothing it started outlives
        it or keeps its stderr open.
        """
        self._started_process()
        await self._exited.wait()
        kill_process_group(self.pid)
        await self._reaped()
        return await self._finish()

    async def _reaped(self) -> None:
        """Wait until the child is reaped and its pipes are closed.

        A process that left the group (a new session) and holds the pipes open does not hold
        us: after a grace period the pipes are closed on our side.
        """
        process = self._started_process()
        try:
            async with asyncio.timeout(STOP_GRACE_SECONDS):
                await asyncio.shield(process.wait())
        except TimeoutError:
            if process.returncode is None or self._transport is None:
                raise
            self._transport.close()
            await asyncio.shield(process.wait())

    async def _finish(self) -> ProcessResult:
        process = self._started_process()
        kill_process_group(process.pid)  # what the child left running in its group
        returncode = process.returncode if process.returncode is not None else -1
        if self.state is ProcessState.RUNNING:
            self.state = ProcessState.EXITED
        if self._ended is None:
            self._ended = time.monotonic()
        if self._stderr_task is not None:
            # The pipe reaches EOF once every holder (the whole group) has gone.
            # (asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation
            # that arrives together with the awaited result.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_GRACE_SECONDS):
                    await asyncio.shield(self._stderr_task)
        return ProcessResult(
            returncode=returncode,
            stderr=self.stderr_text(),
            duration=self._ended - self._started,
            killed_by_us=self.state is ProcessState.KILLED,
        )

    def kill_group(self) -> None:
        """Send SIGKILL to the child's whole process group (works on stopped processes too),
        also when the child itself has ended already."""
        if self._process is None:
            return
        if not self._exited.is_set():
            self.state = ProcessState.KILLED
        kill_process_group(self._process.pid)

    async def stop(self) -> ProcessResult:
        """Kill the process group unless it already ended, and wait until the child is reaped.

        Safe to call several times and from ``finally`` blocks; a cancellation that arrives while
        waiting for the reap is deferred until the reap completed, then re-raised.
        """
        self._started_process()
        self.kill_group()
        cancelled = False
        while True:
            try:
                await asyncio.shield(self._reaped())
                break
            except asyncio.CancelledError:
                cancelled = True
                self.kill_group()
        result = await self._finish()
        if self._stderr_task is not None and not self._stderr_task.done():
            await cancel_and_wait(self._stderr_task)
        if cancelled:
            raise asyncio.CancelledError
        return result

    async def __aenter__(self) -> ManagedProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._process is not None:
            await self.stop()


@dataclass(frozen=True)
class CommandOutput:
    """The result of a short command run to completion."""

    returncode: int
    stdout: str
    stderr: str


async def run_command(
    argv: Sequence[str],
    *,
    time_limit: float,
    env: Mapping[str, str] | None = None,
    credentials: Credentials | None = None,
) -> CommandOutput:
    """Run a short command (own process group, minimal environment) and collect its output.

    Raises :class:`ProcessStartError` when it cannot be started and ``TimeoutError`` when it
    does not finish within *time_limit* seconds (its process group is then killed and reaped).
    """
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _ExitProtocol(exited),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env if env is not None else minimal_environment()),
            close_fds=True,
            cwd="/",
            start_new_session=True,
            user=credentials.uid if credentials else None,
            group=credentials.gid if credentials else None,
            extra_groups=list(credentials.groups) if credentials else None,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        raise ProcessStartError(f"cannot start {argv[0]}: {err}") from err
    process = asyncio.subprocess.Process(transport, protocol, loop)
    output = asyncio.ensure_future(process.communicate())
    try:
        async with asyncio.timeout(time_limit):
            await exited.wait()
            kill_process_group(process.pid)  # what it left behind, holding the pipes open
            stdout, stderr = await output
    finally:
        kill_process_group(process.pid)
        output.cancel()  # a no-op once it is done
        transport.close()  # our ends of the pipes, whoever else holds them
        await asyncio.shield(process.wait())
    return CommandOutput(
        returncode=process.returncode if process.returncode is not None else -1,
        stdout=stdout.decode("utf-8", errors="replace"),
        stderr=stderr.decode("utf-8", errors="replace"),
    )
