"""One probe launch: start QEMU sandboxed, talk QMP over a socketpair, stop it, reap it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from ..capabilities import LaunchRecord
from ..config import DEFAULT_MIGRATION_STREAM_LIMIT
from ..process import (
    ManagedProcess,
    ProcessSpec,
    ProcessState,
    cancel_and_wait,
    minimal_environment,
)
from .events import LaunchEvent, LaunchObserver, LaunchStage
from .evidence import (
    FINAL_MIGRATION_STATES,
    blocked_reasons,
    console_names,
    device_blockers,
    migration_result,
)
from .gldisplay import Screendump, take_screendump
from .migration import IncomingResult, MigrationResult
from .observation import Attempt, LaunchEnd, LaunchObservation, Step
from .plan import DEVICE_ID, DEVICE_QOM_PATH, DeviceSettings, ProbePlan, build_qemu_argv
from .sandbox import ProbeIdentity
from .stream import (
    StreamReceipt,
    receive_stream,
    remove_stream,
    send_stream,
    stream_path,
)

log = logging.getLogger("vfiocaps.prober")

MIGRATION_FD_NAME = "vfiocaps-migration"
MIGRATION_POLL_SECONDS = 0.02
QUIT_GRACE_SECONDS = 5.0
INCOMING_FD_NAME = "vfiocaps-incoming"


@dataclass(frozen=True)
class LaunchContext:
    """What every launch of one probe shares."""

    binary: Path
    machine: str
    vm_uuid: str
    sysfsdev: Path | None
    identity: ProbeIdentity
    workdir: Path  # the probe's private runtime directory
    timeout: float
    environment: dict[str, str]
    observer: LaunchObserver | None = None
    stream_limit: int = (
        DEFAULT_MIGRATION_STREAM_LIMIT  # bytes of migration stream kept for the load
    )
    host: str | None = None  # a PCI function's address, given to QEMU as host=


async def run_launch(
    context: LaunchContext, attempt: Attempt
) -> tuple[LaunchObservation, LaunchRecord]:
    """Run one launch for *attempt* and return what it showed and its record.

    Raises nothing for QEMU's failures (they are in the observation); cancellation propagates
    after the process group has been killed and reaped and every file removed.
    """
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    plan = ProbePlan(
        machine=context.machine,
        accel=attempt.accel,
        vm_uuid=context.vm_uuid,
        qmp_fd=child_sock.fileno(),
        sysfsdev=context.sysfsdev if attempt.settings is not None else None,
        settings=attempt.settings or DeviceSettings(),
        incoming=attempt.step is Step.LOAD,
        host=context.host if attempt.settings is not None else None,
        render_node=attempt.render_node,
    )
    argv = build_qemu_argv(context.binary, plan)
    process = ManagedProcess(
        ProcessSpec(
            argv=argv,
            env=context.environment,
            pass_fds=(child_sock.fileno(),),
            credentials=context.identity.with_groups(*attempt.groups).credentials,
        )
    )
    session = _Session(context, attempt)
    started = time.monotonic()
    try:
        await process.start()
        child_sock.close()
        _notify(context, LaunchStage.STARTED, attempt, process.pid)
        try:
            async with asyncio.timeout(context.timeout):
                await session.run(parent_sock, process)
                result = await process.wait()
        except TimeoutError:
            result = await process.stop()
            session.end = LaunchEnd.TIMEOUT
        else:
            session.end = _classify_end(session, result.returncode, result.killed_by_us)
    finally:
        # Kill first: a stopped or hung QEMU must not hold up closing the QMP session.
        if process.returncode is None and process.state is not ProcessState.NEW:
            await process.stop()
        await session.close()
        parent_sock.close()
        child_sock.close()
        session.remove_files()
    _notify(context, LaunchStage.ENDED, attempt, process.pid)
    duration = time.monotonic() - started
    observation = session.observation(result.returncode, result.stderr)
    record = LaunchRecord(
        purpose=attempt.purpose, argv=argv, duration=duration, exit_status=result.returncode
    )
    log.debug(
        "launch %s ended %s (status %s) after %.3f s",
        attempt.purpose,
        observation.end.value,
        result.returncode,
        duration,
    )
    return observation, record


def _classify_end(session: _Session, returncode: int, killed_by_us: bool) -> LaunchEnd:
    if session.quit_acknowledged and returncode == 0:
        return LaunchEnd.QUIT
    if returncode < 0 and not killed_by_us:
        return LaunchEnd.CRASHED
    return LaunchEnd.EXITED


def _notify(context: LaunchContext, stage: LaunchStage, attempt: Attempt, pid: int) -> None:
    if context.observer is not None:
        context.observer(LaunchEvent(stage, attempt.purpose, pid))


class _Session:
    """The QMP conversation of one launch (mutable state of :func:`run_launch`)."""

    def __init__(self, context: LaunchContext, attempt: Attempt) -> None:
        self.context = context
        self.attempt = attempt
        self.client = QMPClient(f"vfiocaps-{attempt.purpose}")
        # A QEMU that exits at realize closes the socket mid-handshake; qemu.qmp logs that as an
        # error, but for a probe it is an expected answer, classified from stderr.
        self.client.logger.setLevel(logging.CRITICAL)
        self.started = False
        self.quit_sent = False
        self.quit_acknowledged = False
        self.end = LaunchEnd.EXITED
        self.qmp_error = ""
        self.qemu_version = ""
        self.consoles: dict[str, str] = {}
        self.blocked_reasons: tuple[str, ...] = ()
        self.migration: MigrationResult | None = None
        self.incoming: IncomingResult | None = None
        self.screendump: Screendump | None = None
        self.sockets: list[socket.socket] = []
        self.tasks: list[asyncio.Task[int] | asyncio.Task[StreamReceipt]] = []

    async def run(self, sock: socket.socket, process: ManagedProcess) -> None:
        try:
            await self.client.connect(sock)
        except ConnectError as err:
            # QEMU exited before it greeted us: a realize failure, stderr says why.
            log.debug("QMP connection failed: %s", err)
            return
        self.started = True
        self.qemu_version = _greeting_version(self.client)
        _notify(self.context, LaunchStage.QMP_READY, self.attempt, process.pid)
        try:
            await self._inspect()
            self.quit_sent = True
            await self.client.execute("quit")
            self.quit_acknowledged = True
        except ExecuteError as err:
            self.qmp_error = f"{err.error_class}: {err.error.error.desc}"
        except (ExecInterruptedError, QMPError, OSError, EOFError) as err:
            self.qmp_error = f"QMP session lost: {err}"
            if self.quit_sent:
                # QEMU may close the connection before its reply to "quit" arrives.
                self.quit_acknowledged = True
        if not self.quit_acknowledged:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(QUIT_GRACE_SECONDS):
                    await asyncio.shield(process.wait())

    async def _inspect(self) -> None:
        settings = self.attempt.settings
        if settings is None:
            # The self-test: the paused VM can be saved through a socket (which also shows that
            # QMP answers: the save takes three commands).
            self.migration = await self._migrate()
            remove_stream(self.context.workdir)
            return
        if self.attempt.step is Step.LOAD:
            await self._load()
            return
        if self.attempt.step is Step.GL:
            self.consoles = await self._consoles()
            self.screendump = await take_screendump(self.client, self.context.workdir, DEVICE_ID)
            return
        if settings.display.value != "off":
            self.consoles = await self._consoles()
        self.blocked_reasons = await self._blocked_reasons()
        mine, _ = device_blockers(self.blocked_reasons, self._device_names())
        if not mine:
            self.migration = await self._migrate()

    def _device_names(self) -> Iterable[str]:
        sysfsdev = self.context.sysfsdev
        return (sysfsdev.name,) if sysfsdev is not None else ()

    async def _consoles(self) -> dict[str, str]:
        try:
            children = await self.client.execute("qom-list", {"path": "/backend"})
        except ExecuteError as err:
            if err.error_class == "DeviceNotFound":
                return {}  # QEMU 7.2 creates /backend only with the first console
            raise
        consoles: dict[str, str] = {}
        for name in console_names(children):
            linked = await self.client.execute(
                "qom-get", {"path": f"/backend/{name}", "property": "device"}
            )
            consoles[name] = linked if isinstance(linked, str) else ""
        return consoles

    async def _blocked_reasons(self) -> tuple[str, ...]:
        return blocked_reasons(await self.client.execute("query-migrate"))

    async def _migrate(self) -> MigrationResult:
        """Save the paused VM through a socket into the probe's stream file, bounded in size.

        QEMU gets one end of a socketpair (``getfd`` + ``fd:``, understood by every QEMU
        version; an ``fd:`` to a plain file is deprecated since 9.1). A stream past the limit
        is deleted and the save cancelled. A completed stream stays in the private directory
        for the load launch, which deletes it; any other is deleted here.
        """
        workdir, limit = self.context.workdir, self.context.stream_limit
        remove_stream(workdir)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(ours)
        with theirs:
            self.client.send_fd_scm(theirs.fileno())
            await self.client.execute("getfd", {"fdname": MIGRATION_FD_NAME})
        drain = asyncio.create_task(receive_stream(ours, stream_path(workdir), limit))
        self.tasks.append(drain)
        started = time.monotonic()
        try:
            await self.client.execute("migrate", {"uri": f"fd:{MIGRATION_FD_NAME}"})
        except ExecuteError as err:
            return MigrationResult("failed", err.error.error.desc, None, time.monotonic() - started)
        cancelled = False
        while True:
            # QEMU closes its end once the save has ended: the drain's EOF is the moment to ask.
            # Until then (and for a cancel, whose final state follows the close) ask every
            # MIGRATION_POLL_SECONDS.
            if drain.done():
                await asyncio.sleep(MIGRATION_POLL_SECONDS)
            else:
                await asyncio.wait((drain,), timeout=MIGRATION_POLL_SECONDS)
            result = migration_result(
                await self.client.execute("query-migrate"), time.monotonic() - started
            )
            if result is not None:
                break
            if not cancelled and drain.done() and _exceeded(drain):
                cancelled = True
                with contextlib.suppress(ExecuteError):
                    await self.client.execute("migrate_cancel")
        # QEMU closes its end when the migration ends; the file then holds the whole stream.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(QUIT_GRACE_SECONDS):
                await asyncio.shield(drain)
        receipt = _receipt(drain)
        exceeded = receipt is not None and receipt.exceeded
        kept = result.status == "completed" and receipt is not None and not exceeded
        if not kept:
            remove_stream(workdir)
        return dataclasses.replace(
            result,
            stream_bytes=receipt.total if receipt is not None else None,
            stream_kept=kept,
            limit=limit,
            limit_exceeded=exceeded,
        )

    async def _load(self) -> None:
        """Load the saved stream into this ``-incoming defer`` QEMU, then delete the stream.

        Sets :attr:`incoming` as the load progresses, so that a destination that exits on a
        failed load still leaves its duration; the verdict reads the final status, the run
        state and whether the device is realized.
        """
        source = stream_path(self.context.workdir)
        started = time.monotonic()
        self.incoming = IncomingResult("setup")
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sockets.append(ours)
            with theirs:
                self.client.send_fd_scm(theirs.fileno())
                await self.client.execute("getfd", {"fdname": INCOMING_FD_NAME})
            feed = asyncio.create_task(send_stream(ours, source))
            self.tasks.append(feed)
            await self.client.execute("migrate-incoming", {"uri": f"fd:{INCOMING_FD_NAME}"})
            while True:
                reply = await self.client.execute("query-migrate")
                status = str(reply.get("status", "")) if isinstance(reply, dict) else ""
                error = str(reply.get("error-desc", "")) if isinstance(reply, dict) else ""
                self.incoming = IncomingResult(status, error, duration=time.monotonic() - started)
                if status in FINAL_MIGRATION_STATES:
                    break
                await asyncio.sleep(MIGRATION_POLL_SECONDS)
            duration = time.monotonic() - started
            runstate = await self.client.execute("query-status")
            realized: object = None
            if self.context.sysfsdev is not None:
                realized = await self.client.execute(
                    "qom-get", {"path": DEVICE_QOM_PATH, "property": "realized"}
                )
            self.incoming = IncomingResult(
                status,
                error,
                runstate=str(runstate.get("status", "")) if isinstance(runstate, dict) else "",
                realized=realized if isinstance(realized, bool) else None,
                duration=duration,
            )
            if status == "completed" and realized is True:
                await self._leave_resuming()
        finally:
            if self.incoming is not None and not self.incoming.duration:
                self.incoming = dataclasses.replace(
                    self.incoming, duration=time.monotonic() - started
                )
            remove_stream(self.context.workdir)

    async def _leave_resuming(self) -> None:
        """Take the loaded device out of the kernel's RESUMING state, as a real destination does.

        The kernel keeps a device that received a state in RESUMING until the VM runs: QEMU
        moves it on (through STOP, where the driver applies the state) at ``cont``. A
        destination that quits while paused leaves the device mid-migration for its next user,
        which must not find it so (Linux 6.12's mtty dereferences a NULL migration file on its
        next state change). ``cont`` then ``stop`` leave it stopped, as a saved source leaves
        its device; the probe VM runs only between the two. A refusal is QEMU's answer and
        changes nothing here. Raises the QMP client's errors when the session is lost.
        """
        with contextlib.suppress(ExecuteError):
            await self.client.execute("cont")
            await self.client.execute("stop")

    async def close(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.client.disconnect()
        for task in self.tasks:
            with contextlib.suppress(OSError):  # a drain that failed to write its file
                await cancel_and_wait(task)
        for sock in self.sockets:
            sock.close()

    def remove_files(self) -> None:
        """Delete the saved stream unless this launch completed a save kept for the load."""
        if self.migration is None or not self.migration.stream_kept:
            remove_stream(self.context.workdir)

    def observation(self, returncode: int, stderr: str) -> LaunchObservation:
        return LaunchObservation(
            attempt=self.attempt,
            end=self.end,
            started=self.started,
            exit_status=returncode,
            stderr=stderr,
            qmp_error=self.qmp_error,
            consoles=dict(self.consoles),
            blocked_reasons=self.blocked_reasons,
            migration=self.migration,
            incoming=self.incoming,
            qemu_version=self.qemu_version,
            screendump=self.screendump,
        )


def _receipt(drain: asyncio.Task[StreamReceipt]) -> StreamReceipt | None:
    """The receipt of a finished receive task; ``None`` when it failed or is not done."""
    if not drain.done() or drain.cancelled() or drain.exception() is not None:
        return None
    return drain.result()


def _exceeded(drain: asyncio.Task[StreamReceipt]) -> bool:
    """Whether a finished receive task stopped at the stream limit. Raises nothing."""
    receipt = _receipt(drain)
    return receipt is not None and receipt.exceeded


def _greeting_version(client: QMPClient) -> str:
    greeting = client.greeting
    if greeting is None:
        return ""
    qemu = greeting.QMP.version.get("qemu")
    if not isinstance(qemu, dict):
        return ""
    return ".".join(str(qemu.get(part, 0)) for part in ("major", "minor", "micro"))


def probe_environment(extra: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """The environment of a probe QEMU: PATH, a C locale, and exactly the configured *extra*
    variables (``Config.probe_environment``); nothing of vfiocapsd's own environment."""
    return minimal_environment(dict(extra))
