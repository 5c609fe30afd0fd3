"""Single QEMU launches outside a probe's strategy, run the way a probe runs them (same binary,
sandbox, user, groups and grants): what the benchmarks compare a probe with."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ProbeError
from ..process import Credentials
from ..vfiogroup import group_node
from .observation import Attempt, Step
from .plan import Accel, DeviceSettings, machine_for_architecture
from .prober import Prober, launch_identity
from .sandbox import kvm_access, private_directory, resolve_probe_identity
from .target import ProbeTarget

if TYPE_CHECKING:
    from .launch import LaunchContext


@dataclass(frozen=True)
class LaunchAnswer:
    """One launch with one device setting: did QEMU come up with it, and how long it took."""

    started: bool  # QEMU came up and its QMP session was established
    seconds: float  # wall time of the launch, start to reaped


@dataclass(frozen=True)
class RoundTrip:
    """A save launch and the ``-incoming defer`` launch that loads its stream (no device)."""

    save_launch: float  # wall seconds of each launch
    load_launch: float
    save: float  # QEMU's own seconds for the save and the load
    load: float
    stream_bytes: int
    load_status: str  # the destination's final migration status


def probe_accel(prober: Prober) -> Accel:
    """The accelerator a probe would use now: KVM when the probe user can use it, else TCG.

    Raises:
        ProbeSandboxError: the probe user is unusable.
    """
    config = prober.config
    identity = resolve_probe_identity(config.probe_user, config.dev_root)
    return Accel.KVM if kvm_access(config.dev_root, identity).usable else Accel.TCG


def launch_credentials(prober: Prober, stack: contextlib.ExitStack) -> Credentials | None:
    """The user and groups a probe QEMU runs with (None as root without a probe user), with
    /dev/kvm made usable for the life of *stack* as for a probe.

    Raises:
        ProbeSandboxError: the probe user is unusable.
        GrantError: /dev/kvm cannot be lent.
    """
    config = prober.config
    identity = resolve_probe_identity(config.probe_user, config.dev_root)
    kvm = kvm_access(config.dev_root, identity)
    return launch_identity(identity, kvm, prober.grants, stack).credentials


def _context(prober: Prober, workdir: Path, target: ProbeTarget | None, stack: contextlib.ExitStack
             ) -> LaunchContext:  # fmt: skip
    from .launch import LaunchContext, probe_environment  # as the prober: at first use

    config = prober.config
    identity = resolve_probe_identity(config.probe_user, config.dev_root)
    if target is not None and identity.credentials is not None:
        node = group_node(config.dev_root, target.iommu_group or "")
        stack.enter_context(prober.grants.granted(node, identity.uid))
    kvm = kvm_access(config.dev_root, identity)
    return LaunchContext(
        binary=config.qemu_binary,
        machine=machine_for_architecture(prober.architecture),
        vm_uuid=str(uuid.uuid4()),
        sysfsdev=target.sysfs_path if target else None,
        host=target.qemu_host(config.sysfs_root) if target else None,
        identity=launch_identity(identity, kvm, prober.grants, stack),
        workdir=workdir,
        timeout=config.probe_timeout,
        environment=probe_environment(config.probe_environment),
        stream_limit=config.migration_stream_limit,
    )


async def ask_each(
    prober: Prober, target: ProbeTarget, questions: Sequence[DeviceSettings], accel: Accel
) -> list[LaunchAnswer]:
    """One launch of *target* per question (device setting), one after another, with the
    device's group node lent for all of them: the naive way of asking.

    Raises:
        ProbeError: a launch could not start; GrantError: the node cannot be lent.
    """
    from .launch import run_launch

    if not target.iommu_group:
        raise ProbeError(f"{target.device_id} has no IOMMU group")
    answers = []
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(private_directory(prober.config.runtime_dir))
        context = _context(prober, workdir, target, stack)
        for settings in questions:
            observation, record = await run_launch(context, Attempt(Step.DISCOVER, settings, accel))
            answers.append(LaunchAnswer(observation.started, record.duration))
    return answers


async def round_trip(prober: Prober, settings: DeviceSettings, accel: Accel) -> RoundTrip:
    """Save a paused VM without a device to the probe's stream, then load it into a fresh QEMU
    started with ``-incoming defer``: the QEMU and stream part of a migratable type's probe.

    Raises:
        ProbeError: a launch could not start, or the round trip did not run.
    """
    from .launch import run_launch

    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(private_directory(prober.config.runtime_dir))
        context = _context(prober, workdir, None, stack)
        saved, save_record = await run_launch(context, Attempt(Step.DISCOVER, settings, accel))
        loaded, load_record = await run_launch(context, Attempt(Step.LOAD, settings, accel))
    if saved.migration is None or loaded.incoming is None:
        raise ProbeError("the round trip did not run")
    return RoundTrip(
        save_launch=save_record.duration,
        load_launch=load_record.duration,
        save=saved.migration.duration,
        load=loaded.incoming.duration,
        stream_bytes=saved.migration.stream_bytes or 0,
        load_status=loaded.incoming.status,
    )
