"""The prober: one device in, a ProbeReport out, after as few sandboxed QEMU launches as needed."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..capabilities import LaunchRecord, ProbeOutcome, ProbeReport
from ..config import Config
from ..errors import ProbeBusyError, ProbeError
from ..model import Device, Parent
from ..process import ProcessStartError
from ..qemubinary import QemuBinary
from ..runstate import Lifecycle
from ..vfiogroup import group_node
from .grants import NodeGrants
from .identity import QemuMissingError, binary_stat, read_identity, read_properties
from .observation import Attempt, Step, Verdict
from .sandbox import (
    KvmAccess,
    ProbeIdentity,
    ProbeSandboxError,
    check_group_not_busy,
    device_nodes_by_group,
    kvm_access,
    private_directory,
    remove_stale_probe_directories,
    resolve_probe_identity,
)
from .steptimes import LAUNCHES, StepClock

if TYPE_CHECKING:
    from .events import LaunchObserver
    from .launch import LaunchContext
    from .migration import KernelMigrationFacts
    from .strategy import ProbeStrategy
    from .target import ProbeTarget

log = logging.getLogger("vfiocaps.prober")


@dataclass
class _ProbeRun:
    """Mutable state of one probe."""

    launches: list[LaunchRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    clock: StepClock = field(default_factory=StepClock)


def launch_identity(
    identity: ProbeIdentity, kvm: KvmAccess, grants: NodeGrants, stack: contextlib.ExitStack
) -> ProbeIdentity:
    """The user and groups a probe QEMU runs with, /dev/kvm made usable: the node's group added,
    or the node lent to the probe user for the life of *stack*. Unchanged as root or without a
    usable KVM.

    Raises:
        GrantError: the node cannot be lent (see :meth:`NodeGrants.granted`).
    """
    if not kvm.usable or identity.credentials is None:
        return identity
    if kvm.needs_grant:
        stack.enter_context(grants.granted(kvm.node, identity.uid))
    return identity.with_groups(kvm.group) if kvm.group is not None else identity


def taken_during_probe(verdict: Verdict, node: Path, probe_uid: int) -> Verdict:
    """A probe that failed after someone took its group node from the probe user (libvirt
    labels the node for a VM it starts) was cut short, not answered: busy, which is not cached
    and is retried. Other verdicts are returned as they are."""
    if verdict.outcome is not ProbeOutcome.FAILED:
        return verdict
    try:
        owner = os.stat(node).st_uid
    except OSError:
        return verdict
    if owner == probe_uid:
        return verdict
    return Verdict(
        ProbeOutcome.BUSY,
        error=f"{node} was given to uid {owner} during the probe (a VM starting on the device?); "
        f"the probe was cut short ({verdict.error}) and is tried again",
        stderr_excerpt=verdict.stderr_excerpt,
        notes=verdict.notes,
    )


class Prober:
    """Probes devices with a minimal sandboxed QEMU; safe to use from several tasks at once.

    *observer*, when given, is told when each QEMU launch starts, has its QMP session and has
    been reaped (with the QEMU pid); *architecture* overrides the host's for the machine type;
    *lifecycle* is the daemon's run-state, which says when discovered devices may be probed
    (never, without one).
    """

    def __init__(
        self,
        config: Config,
        *,
        observer: LaunchObserver | None = None,
        architecture: str | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self.architecture = architecture
        self.grants = NodeGrants(journal=config.runtime_dir / "grants", dev_root=config.dev_root)
        self._lifecycle = lifecycle or Lifecycle()

    async def read_qemu(self) -> QemuBinary:
        """Ask the configured QEMU binary who it is: its version (one short launch), all the
        daemon needs to serve; the ``vfio-pci`` properties are left to
        :meth:`read_qemu_properties`. The daemon's engine keeps the answer and hands it to each
        probe.

        Raises:
            QemuMissingError: the binary does not exist or cannot be executed.
            QemuUnusableError: the binary does not answer like QEMU.
            ProbeSandboxError: the probe user is unusable.
        """
        return await read_identity(self.config.qemu_binary, self._identity().credentials)

    async def read_qemu_properties(self, qemu: QemuBinary) -> QemuBinary:
        """*qemu* with its ``vfio-pci`` properties (one short launch), which shape a probe's
        launches; the change time and size are those of the file asked.

        Raises:
            QemuMissingError, QemuUnusableError, ProbeSandboxError: see :meth:`read_qemu`.
        """
        return await read_properties(qemu, self._identity().credentials)

    async def _binary_for(self, qemu: QemuBinary | None) -> tuple[Path, QemuBinary]:
        """The file to launch and its identity with its properties: *qemu* while the file is
        unchanged (a stat, no launch), else what the binary says now; the properties are asked
        when *qemu* lacks them.

        Raises:
            QemuMissingError, QemuUnusableError, ProbeSandboxError: see :meth:`read_qemu`.
        """
        resolved, st = binary_stat(self.config.qemu_binary)
        if qemu is None or (qemu.ctime_ns, qemu.size) != (st.st_ctime_ns, st.st_size):
            qemu = await self.read_qemu()
        if qemu.vfio_pci_properties is None:
            qemu = await self.read_qemu_properties(qemu)
        return resolved, qemu

    def _identity(self) -> ProbeIdentity:
        """Who QEMU runs as, looked up anew each time: a probe user created while the daemon
        runs is used from the next probe on. Raises :class:`ProbeSandboxError`."""
        return resolve_probe_identity(self.config.probe_user, self.config.dev_root)

    def recover_grants(self) -> list[Path]:
        """Remove what killed probes left in the runtime directory, give back device nodes
        that dead processes left lent to the probe user, and reset nodes the probe user owns
        without a grant; return those nodes. Call before the first probe.

        Raises :class:`~vfiocaps.prober.grantjournal.GrantError` when the journal is unsafe to use.
        """
        for path in remove_stale_probe_directories(self.config.runtime_dir):
            log.warning("removed %s, left by a killed probe", path)
        if os.geteuid() != 0:
            return []
        try:
            probe_uid: int | None = self._identity().uid
        except ProbeSandboxError as err:
            log.warning("%s", err)
            probe_uid = None
        return self.grants.recover(probe_uid)

    async def wait_allowed(self) -> None:
        """Return once the daemon serves: it owns its name, so that a second daemon, which will
        not get the name, never lends a device node."""
        await self._lifecycle.wait_serving()

    async def probe_device(
        self, device: Device, parent: Parent | None, qemu: QemuBinary | None
    ) -> ProbeReport:
        """Probe a discovered device, once the daemon serves; an mdev is probed
        with its parent's driver identity.

        Never raises for device- or host-level failures (see :meth:`probe`).
        """
        await self.wait_allowed()
        if device.driver is None and parent is not None and parent.driver is not None:
            device = replace(device, driver=parent.driver)
        from .target import ProbeTarget

        return await self.probe(ProbeTarget.from_device(device), qemu)

    async def probe(self, target: ProbeTarget, qemu: QemuBinary | None = None) -> ProbeReport:
        """Probe *target* with the binary *qemu* (``None``: read it now) and report; never
        raises for device- or host-level failures.

        The outcome says what happened (``ok``, ``busy``, ``no-kvm``, ``qemu-missing``,
        ``timeout``, ``crashed``, ``failed``). Cancellation propagates, after QEMU's process
        group has been killed and reaped, device nodes restored and files removed.
        """
        return await self._run(target, qemu)

    async def check_qemu(self, qemu: QemuBinary | None = None) -> ProbeReport:
        """Start the sandboxed QEMU (*qemu*, or the binary read now) without a device, complete
        a QMP session and stop it.

        A self-test of the binary, the probe user and the sandbox; never raises (see
        :meth:`probe`).
        """
        return await self._run(None, qemu)

    async def _run(self, target: ProbeTarget | None, qemu: QemuBinary | None) -> ProbeReport:
        run = _ProbeRun()
        try:
            verdict = await self._probe(target, qemu, run)
        except QemuMissingError as err:
            verdict = Verdict(ProbeOutcome.QEMU_MISSING, error=str(err))
        except ProbeBusyError as err:
            verdict = Verdict(ProbeOutcome.BUSY, error=str(err))
        except ProbeError as err:
            verdict = Verdict(ProbeOutcome.FAILED, error=str(err))
        report = ProbeReport(
            outcome=verdict.outcome,
            capabilities=verdict.capabilities,
            error=verdict.error,
            stderr_excerpt=verdict.stderr_excerpt,
            launches=tuple(run.launches),
            notes=tuple(dict.fromkeys((*run.notes, *verdict.notes))),
        )
        log.info(
            "probe of %s: %s after %d launch(es), %.3f s%s",
            target.device_id if target else "QEMU",
            report.outcome.value,
            len(report.launches),
            report.duration,
            f": {report.error}" if report.error else "",
        )
        run.clock.lap("report")
        if log.isEnabledFor(logging.DEBUG):  # the summary is not made for nothing
            log.debug(
                "probe of %s: %s", target.device_id if target else "QEMU", run.clock.summary()
            )
        return report

    async def _probe(
        self, target: ProbeTarget | None, known: QemuBinary | None, run: _ProbeRun
    ) -> Verdict:
        # The launch code (QMP, the strategy, the kernel's facts, the QEMU command line) is
        # imported by the first probe, not by the daemon's start, which does not need it before
        # it serves.
        import uuid

        from .kernelfacts import read_kernel_facts
        from .launch import LaunchContext, probe_environment
        from .plan import Accel, machine_for_architecture
        from .render import render_access
        from .strategy import ProbeStrategy

        clock = run.clock
        clock.lap("imports")
        # One scan of the device nodes for every check of this probe (the probe user's groups,
        # /dev/kvm's and a render node's group); only root switches users and checks groups.
        dev_root = self.config.dev_root
        scanned = device_nodes_by_group(dev_root) if os.geteuid() == 0 else None
        clock.lap("device scan")
        identity = resolve_probe_identity(self.config.probe_user, dev_root, scanned)
        run.notes.append(identity.description)
        clock.lap("identity")
        binary, qemu = await self._binary_for(known)
        machine = machine_for_architecture(self.architecture)
        clock.lap("binary")
        node: Path | None = None
        if target is not None:
            if not target.iommu_group:
                raise ProbeError(f"{target.device_id} has no IOMMU group")
            node = group_node(self.config.dev_root, target.iommu_group)
            check_group_not_busy(node)
        kvm = kvm_access(dev_root, identity, scanned)
        if kvm.usable:
            accel = Accel.KVM
        else:
            accel = Accel.TCG
            run.notes.append(f"KVM is not usable ({kvm.reason}); probing with TCG")
        clock.lap("checks")
        with contextlib.ExitStack() as stack:
            workdir = stack.enter_context(private_directory(self.config.runtime_dir))
            clock.lap("sandbox")
            if identity.credentials is not None and node is not None:
                stack.enter_context(self.grants.granted(node, identity.uid))
            identity = launch_identity(identity, kvm, self.grants, stack)
            clock.lap("grant")
            kernel: KernelMigrationFacts | None = None
            if target is not None and node is not None:
                kernel = await read_kernel_facts(
                    self.config.dev_root, node, target.qemu_name, identity.credentials
                )
            clock.lap("features")
            context = LaunchContext(
                binary=binary,
                machine=machine,
                vm_uuid=str(uuid.uuid4()),
                sysfsdev=target.sysfs_path if target else None,
                host=target.qemu_host(self.config.sysfs_root) if target else None,
                identity=identity,
                workdir=workdir,
                timeout=self.config.probe_timeout,
                environment=probe_environment(self.config.probe_environment),
                observer=self.observer,
                stream_limit=self.config.migration_stream_limit,
            )
            strategy = ProbeStrategy(
                vfio_pci_properties=qemu.vfio_pci_properties or frozenset(),
                accel=accel,
                device_names=(target.qemu_name,) if target else (),
                kernel=kernel,
                render=render_access(dev_root, identity, scanned) if target else None,
            )
            attempt = strategy.first() if target else Attempt(Step.BARE, None, accel)
            clock.lap("plan")
            verdict = await self._launches(context, strategy, attempt, run)
            clock.lap(LAUNCHES)
            # What the launch records do not hold: the decisions and set-up between launches.
            own = sum(record.duration for record in run.launches)
            clock.move(LAUNCHES, "between launches", clock.steps[LAUNCHES] - own)
            if node is not None and identity.credentials is not None:
                verdict = taken_during_probe(verdict, node, identity.uid)
        clock.lap("release")
        return verdict

    async def _launches(
        self, context: LaunchContext, strategy: ProbeStrategy, attempt: Attempt, run: _ProbeRun
    ) -> Verdict:
        from .launch import run_launch

        while True:
            try:
                observation, record = await run_launch(context, attempt)
            except ProcessStartError as err:
                try:
                    binary_stat(context.binary)
                except QemuMissingError as missing:
                    raise missing from err
                raise ProbeError(str(err)) from err
            run.launches.append(record)
            decision = strategy.next(observation)
            if isinstance(decision, Verdict):
                return decision
            attempt = decision
