"""Pure probe decisions: which launch comes next, and what the evidence of each launch means.

A probe starts with the configuration most likely to tell everything in one launch (display and
migration on ``auto``, cold-plugged, then a real save of the paused VM) and falls back only
where QEMU's answer leaves a question open:

* ``opengl not available`` at realize: a dma-buf display that needs GL; relaunch with display off
  to learn about migration;
* the save of the paused VM fails in device dirty tracking (mtty): the verdict for QEMU's
  defaults is ``unsupported``; relaunch with ``x-device-dirty-page-tracking=off,
  enable-migration=on`` and save again;
* a save that completes: one more launch, ``-incoming defer``, loads the saved state into a
  fresh QEMU on the same device (at most one such launch per probe);
* ``failed to initialize kvm``: the same launch again with TCG;
* a dma-buf display that needs GL, on a host with a render node the probe user can reach: one
  last launch with ``-display egl-headless,rendernode=<node>`` and ``display=on`` tells whether
  this host sets the display up. Its failures and crashes are the GL verdict, never the probe's.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..capabilities import Capabilities, Display, GlHost, ProbeOutcome
from .gldisplay import Screendump
from .messages import Meaning, excerpt, findings, first_failure
from .migration import (
    DEVICE_DIRTY_TRACKING,
    ENABLE_MIGRATION,
    LOADED_RUNSTATES,
    TRACKING_OFF_OPTIONS,
    Configuration,
    IncomingResult,
    KernelMigrationFacts,
    MigrationLedger,
    MigrationResult,
    destination_error,
    migration_conditions,
)
from .plan import DEVICE_QOM_PATH, Accel, DeviceSettings, OnOffAuto
from .render import RenderAccess

MAX_LAUNCHES = 6  # a KVM retry, discover, display-off, tracking-off, load, gl


class Step(enum.Enum):
    """The purpose of one launch."""

    BARE = "bare"  # no device: QEMU and sandbox self-test
    DISCOVER = "discover"  # display=auto, migration=auto, migrate the paused VM
    DISPLAY_OFF = "display-off"  # the display is known; learn about migration
    MIGRATION_OFF = "migration-off"  # migration is known (refused at realize); learn the display
    TRACKING_OFF = "tracking-off"  # migrate again without device dirty tracking
    LOAD = "load"  # -incoming defer: load the saved state into a fresh QEMU
    GL = "gl"  # display=on under egl-headless on a render node: does this host set it up?


@dataclass(frozen=True)
class Attempt:
    """One launch to make."""

    step: Step
    settings: DeviceSettings | None
    accel: Accel
    render_node: Path | None = None  # OpenGL through egl-headless on this node
    groups: tuple[int, ...] = ()  # supplementary groups QEMU gets for this launch only

    @property
    def purpose(self) -> str:
        """The launch's purpose as recorded in its :class:`LaunchRecord`."""
        return self.step.value


class LaunchEnd(enum.Enum):
    """How a launch ended."""

    QUIT = "quit"  # the session completed and QEMU quit when asked
    EXITED = "exited"  # QEMU exited on its own (realize failure, error)
    CRASHED = "crashed"  # QEMU died from a signal we did not send
    TIMEOUT = "timeout"  # we killed it at the deadline


@dataclass(frozen=True)
class LaunchObservation:
    """Everything one launch showed: how it ended, stderr, and what QMP answered."""

    attempt: Attempt
    end: LaunchEnd
    started: bool  # the QMP session was established
    exit_status: int | None = None
    stderr: str = ""
    qmp_error: str = ""
    consoles: Mapping[str, str] = field(default_factory=dict)  # console -> device QOM path
    blocked_reasons: tuple[str, ...] = ()
    migration: MigrationResult | None = None
    incoming: IncomingResult | None = None
    qemu_version: str = ""
    screendump: Screendump | None = None


@dataclass(frozen=True)
class Verdict:
    """The end of a probe."""

    outcome: ProbeOutcome
    capabilities: Capabilities | None = None
    error: str = ""
    stderr_excerpt: str = ""
    notes: tuple[str, ...] = ()


def linked_console(consoles: Mapping[str, str], device_path: str) -> str | None:
    """The console whose ``device`` link names the device, or ``None``. Raises nothing."""
    wanted = device_path.rstrip("/")
    for name, linked in consoles.items():
        if linked and linked.rstrip("/") == wanted:
            return name
    return None


def display_from_consoles(consoles: Mapping[str, str], device_path: str) -> Display:
    """REGION when a console's ``device`` link names the device, else NONE. Raises nothing."""
    return Display.NONE if linked_console(consoles, device_path) is None else Display.REGION


def device_blockers(
    blocked_reasons: Iterable[str], names: Iterable[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split migration blockers into (this device's, others').

    A blocker is the device's when it names the device (QEMU 10 prefixes them with the device
    name) or is one of the known VFIO migration blocker texts (QEMU 7.2 names no device).
    """
    names = [name for name in names if name]
    mine: list[str] = []
    others: list[str] = []
    for reason in blocked_reasons:
        failure = first_failure(reason)
        known_vfio = failure is not None and failure.meaning in (
            Meaning.MIGRATION_UNSUPPORTED,
            Meaning.DIRTY_TRACKING_UNSUPPORTED,
        )
        (mine if known_vfio or any(name in reason for name in names) else others).append(reason)
    return tuple(mine), tuple(others)


@dataclass
class Knowledge:
    """What the probe has learned so far (mutable runtime state of a :class:`ProbeStrategy`)."""

    display: Display = Display.UNKNOWN
    gl_required: bool = False
    migration_settled: bool = False  # no further launch is needed for migration
    ledger: MigrationLedger = field(default_factory=MigrationLedger)
    loading: Configuration | None = None  # the configuration whose saved state awaits its load
    migration_notes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    qemu_version: str = ""


class ProbeStrategy:
    """Decides each next launch from the previous launches' observations; no I/O."""

    def __init__(
        self,
        *,
        vfio_pci_properties: frozenset[str],
        accel: Accel,
        device_names: Iterable[str],
        kernel: KernelMigrationFacts | None = None,
        render: RenderAccess | None = None,
    ) -> None:
        self.properties = vfio_pci_properties
        self.accel = accel
        self.names = tuple(device_names)
        self.kernel = kernel
        self.render = render
        self.knowledge = Knowledge()
        self.launches = 0
        self._kvm_retried = False
        self._loads = 0
        self._before_gl: Verdict | None = None  # the answer the GL launch completes

    @property
    def can_disable_device_tracking(self) -> bool:
        """Whether this QEMU has both properties the dirty-tracking retry needs."""
        return {ENABLE_MIGRATION, DEVICE_DIRTY_TRACKING} <= self.properties

    def _settings(self, display: OnOffAuto, migration: OnOffAuto | None) -> DeviceSettings:
        if ENABLE_MIGRATION not in self.properties:
            migration = None
        return DeviceSettings(display=display, migration=migration)

    def first(self) -> Attempt:
        """The first launch: everything on ``auto``."""
        return Attempt(Step.DISCOVER, self._settings(OnOffAuto.AUTO, OnOffAuto.AUTO), self.accel)

    def next(self, observation: LaunchObservation) -> Attempt | Verdict:
        """The launch to make after *observation*, or the probe's verdict. Raises nothing."""
        self.launches += 1
        if observation.qemu_version:
            self.knowledge.qemu_version = observation.qemu_version
        if observation.attempt.step is Step.GL and self._before_gl is not None:
            return self._after_gl(observation, self._before_gl)
        decision = self._decide(observation)
        if isinstance(decision, Verdict):
            return self._with_gl(decision)
        if self.launches >= MAX_LAUNCHES:
            return self._failed(observation, f"no answer after {self.launches} launches")
        return decision

    def _decide(self, obs: LaunchObservation) -> Attempt | Verdict:
        if obs.end is LaunchEnd.TIMEOUT:
            return Verdict(
                ProbeOutcome.TIMEOUT,
                error=f"QEMU ({obs.attempt.purpose}) did not finish in time and was killed",
                stderr_excerpt=excerpt(obs.stderr),
                notes=tuple(self.knowledge.notes),
            )
        if obs.attempt.step is Step.LOAD:
            return self._after_load(obs)
        if obs.end is LaunchEnd.CRASHED:
            return Verdict(
                ProbeOutcome.CRASHED,
                error=f"QEMU ({obs.attempt.purpose}) {describe_status(obs.exit_status)}",
                stderr_excerpt=excerpt(obs.stderr),
                notes=tuple(self.knowledge.notes),
            )
        if obs.end is LaunchEnd.QUIT and obs.started:
            return self._after_session(obs)
        return self._after_failure(obs)

    # -- a launch that failed before or during its session -------------------------------

    def _after_failure(self, obs: LaunchObservation) -> Attempt | Verdict:
        attempt = obs.attempt
        failure = first_failure(f"{obs.stderr}\n{obs.qmp_error}")
        if failure is None:
            what = describe_status(obs.exit_status)
            detail = f": {obs.qmp_error}" if obs.qmp_error else ""
            return self._failed(obs, f"QEMU ({attempt.purpose}) {what}{detail}")
        meaning = failure.meaning
        settings = attempt.settings
        know = self.knowledge
        if meaning is Meaning.BUSY:
            return Verdict(
                ProbeOutcome.BUSY,
                error=failure.line,
                stderr_excerpt=excerpt(obs.stderr),
                notes=tuple(know.notes),
            )
        if meaning is Meaning.KVM_REQUIRED:
            outcome = ProbeOutcome.NO_KVM if attempt.accel is Accel.TCG else ProbeOutcome.FAILED
            return Verdict(
                outcome,
                error=failure.line,
                stderr_excerpt=excerpt(obs.stderr),
                notes=tuple(know.notes),
            )
        if (
            meaning is Meaning.KVM_UNAVAILABLE
            and attempt.accel is Accel.KVM
            and not self._kvm_retried
        ):
            self._kvm_retried = True
            self.accel = Accel.TCG
            know.notes.append(f"KVM could not be used ({failure.line}); probed with TCG")
            return replace(attempt, accel=Accel.TCG)
        if (
            settings is not None
            and meaning in (Meaning.GL_REQUIRED, Meaning.NO_DISPLAY)
            and settings.display is not OnOffAuto.OFF
        ):
            if meaning is Meaning.GL_REQUIRED:
                know.display, know.gl_required = Display.DMABUF, True
            else:
                know.display, know.gl_required = Display.NONE, False
            if know.migration_settled:
                return self._ok()
            display_off = self._settings(OnOffAuto.OFF, settings.migration)
            return Attempt(Step.DISPLAY_OFF, display_off, attempt.accel)
        if settings is not None and meaning in (
            Meaning.MIGRATION_UNSUPPORTED,
            Meaning.DIRTY_TRACKING_UNSUPPORTED,
        ):
            know.ledger.refuse(_configuration(attempt), _strip_option_prefix(failure.line))
            know.migration_settled = True
            if know.display is not Display.UNKNOWN or settings.display is OnOffAuto.OFF:
                return self._ok()
            migration_off = self._settings(settings.display, OnOffAuto.OFF)
            return Attempt(Step.MIGRATION_OFF, migration_off, attempt.accel)
        return self._failed(obs, failure.line)

    # -- a launch whose session completed ------------------------------------------------

    def _after_session(self, obs: LaunchObservation) -> Attempt | Verdict:
        attempt = obs.attempt
        settings = attempt.settings
        know = self.knowledge
        if settings is None:  # a bare launch: QEMU, QMP, the sandbox and migration work
            result = obs.migration
            if result is not None and result.status != "completed":
                return self._failed(
                    obs, f"the paused VM could not be migrated: {result.error or result.status}"
                )
            if result is not None and result.stream_bytes is not None:
                know.notes.append(
                    f"the paused VM saved {result.stream_bytes} bytes in {result.duration:.2f} s"
                )
            return Verdict(ProbeOutcome.OK, notes=tuple(know.notes))
        if settings.display is not OnOffAuto.OFF and know.display is Display.UNKNOWN:
            know.display = display_from_consoles(obs.consoles, DEVICE_QOM_PATH)
            know.gl_required = False
        if know.migration_settled:
            return self._ok()
        configuration = _configuration(attempt)
        mine, others = device_blockers(obs.blocked_reasons, self.names)
        if others:
            know.notes.append("migration blockers of other origin: " + "; ".join(others))
        if mine:
            for blocker in mine:
                know.ledger.refuse(configuration, blocker)
            know.migration_settled = True
            return self._ok()
        result = obs.migration
        if result is None:
            know.notes.append("the migration of the paused VM was not attempted")
            know.migration_settled = True
            return self._ok()
        if result.status == "completed" or result.limit_exceeded:
            if know.ledger.saved(configuration, result) and self._loads == 0:
                self._loads += 1
                know.loading = configuration
                return Attempt(Step.LOAD, settings, attempt.accel)
            know.migration_settled = True
            return self._ok()
        # QEMU 10 reports "ram_save_setup failed" to QMP; the cause is on stderr.
        tracking_failed = any(
            found.meaning is Meaning.DEVICE_DIRTY_TRACKING_FAILED
            for found in findings(f"{result.error}\n{obs.stderr}")
        )
        know.ledger.refuse(configuration, result.error or f"migration {result.status}")
        if tracking_failed and self.kernel is not None and self.kernel.dirty_tracking:
            know.migration_notes.append(
                "the kernel accepts DMA logging for the device (VFIO_DEVICE_FEATURE probe), "
                "but QEMU could not read the log during the save"
            )
        if (
            tracking_failed
            and configuration is Configuration.DEFAULTS
            and self.can_disable_device_tracking
        ):
            know.ledger.options = TRACKING_OFF_OPTIONS
            retry = DeviceSettings(
                display=OnOffAuto.OFF, migration=OnOffAuto.ON, device_dirty_tracking=False
            )
            return Attempt(Step.TRACKING_OFF, retry, attempt.accel)
        know.migration_settled = True
        return self._ok()

    # -- the load side of a round trip ---------------------------------------------------

    def _after_load(self, obs: LaunchObservation) -> Attempt | Verdict:
        """Judge the destination: paused, device realized, migration completed, and no load
        error on its stderr (nothing reported lost)."""
        know = self.knowledge
        configuration = know.loading or Configuration.DEFAULTS
        know.loading = None
        know.migration_settled = True
        if obs.end is LaunchEnd.TIMEOUT:
            return Verdict(
                ProbeOutcome.TIMEOUT,
                error="QEMU (load) did not finish in time and was killed",
                stderr_excerpt=excerpt(obs.stderr),
                notes=tuple(know.notes),
            )
        failure = first_failure(f"{obs.stderr}\n{obs.qmp_error}")
        if failure is not None and failure.meaning is Meaning.BUSY:
            return Verdict(
                ProbeOutcome.BUSY,
                error=failure.line,
                stderr_excerpt=excerpt(obs.stderr),
                notes=tuple(know.notes),
            )
        incoming = obs.incoming
        reported_lost = any(found.meaning is Meaning.LOAD_FAILED for found in findings(obs.stderr))
        if (
            obs.end is LaunchEnd.QUIT
            and not reported_lost
            and incoming is not None
            and incoming.status == "completed"
            and incoming.runstate in LOADED_RUNSTATES
            and incoming.realized is True
        ):
            know.ledger.loaded(configuration, incoming)
            return self._ok()
        error = destination_error(obs.stderr, obs.qmp_error, incoming)
        if obs.end is LaunchEnd.CRASHED:
            error = f"the destination QEMU {describe_status(obs.exit_status)}: {error}"
        know.ledger.load_failed(configuration, error, incoming.duration if incoming else 0.0)
        return self._ok()

    # -- the GL check of a dma-buf display -----------------------------------------------

    def _with_gl(self, verdict: Verdict) -> Attempt | Verdict:
        """*verdict* with the host's GL answer, or the GL launch that finds it out."""
        caps = verdict.capabilities
        if verdict.outcome is not ProbeOutcome.OK or caps is None:
            return verdict
        render = self.render
        if not caps.gl_required:
            return _with_gl_answer(verdict, GlHost.NOT_NEEDED, "", "")
        if render is None:
            return verdict  # not asked to check this host
        node = str(render.node) if render.node is not None else ""
        if render.node is None:
            detail = f"{render.reason}: QEMU cannot give the dma-buf display OpenGL on this host"
            return _with_gl_answer(verdict, GlHost.NO_RENDER_NODE, node, detail)
        if not render.usable:
            return _with_gl_answer(verdict, GlHost.INACCESSIBLE, node, render.reason)
        if self.launches >= MAX_LAUNCHES:
            detail = f"not checked: no launch left after {self.launches}"
            return _with_gl_answer(verdict, GlHost.UNKNOWN, node, detail)
        self._before_gl = verdict
        groups = (render.group,) if render.group is not None else ()
        settings = self._settings(OnOffAuto.ON, OnOffAuto.OFF)
        return Attempt(Step.GL, settings, self.accel, render.node, groups)

    def _after_gl(self, obs: LaunchObservation, before: Verdict) -> Verdict:
        """The answer before the GL launch, completed with what the GL launch showed."""
        self._before_gl = None
        failure = first_failure(f"{obs.stderr}\n{obs.qmp_error}")
        if obs.end is not LaunchEnd.CRASHED and failure and failure.meaning is Meaning.BUSY:
            return Verdict(
                ProbeOutcome.BUSY,
                error=failure.line,
                stderr_excerpt=excerpt(obs.stderr),
                notes=tuple(self.knowledge.notes),
            )
        node = str(obs.attempt.render_node or "")
        gl_host, detail = gl_verdict(obs, node)
        return _with_gl_answer(before, gl_host, node, detail)

    # -- verdicts ------------------------------------------------------------------------

    def _ok(self) -> Verdict:
        know = self.knowledge
        ledger = know.ledger
        migration, blockers, with_options, options = ledger.published()
        proven = ledger.proven()
        kernel = self.kernel
        observable = kernel is not None and kernel.observable
        best = with_options if options else migration
        return Verdict(
            ProbeOutcome.OK,
            Capabilities(
                display=know.display,
                gl_required=know.gl_required,
                migration=migration,
                migration_blockers=blockers,
                migration_notes=(*know.migration_notes, *ledger.option_notes(), *ledger.notes),
                qemu_version=know.qemu_version,
                migration_options=options,
                migration_with_options=with_options,
                migration_state_bytes=proven.state_bytes if proven else 0,
                migration_save_seconds=proven.save_seconds if proven else 0.0,
                migration_load_seconds=proven.load_seconds if proven else 0.0,
                migration_flags=kernel.flags if kernel is not None and observable else (),
                device_dirty_tracking=kernel.dirty_tracking if kernel and observable else None,
                migration_conditions=migration_conditions(best, options, know.qemu_version, kernel),
            ),
            notes=tuple(know.notes),
        )

    def _failed(self, obs: LaunchObservation, error: str) -> Verdict:
        return Verdict(
            ProbeOutcome.FAILED,
            error=error,
            stderr_excerpt=excerpt(f"{obs.stderr}\n{obs.qmp_error}".strip()),
            notes=tuple(self.knowledge.notes),
        )


GL_LIMIT = (
    "a guest's frames are not proven: with software rendering (a render node without a GPU, "
    "such as vgem) QEMU may still fail, or crash, on the first frame a guest draws"
)
GL_CRASH_CAUSE = (
    "with software rendering QEMU crashes once the device shows a mode a guest set, and an "
    "mbochs-like instance keeps its mode across QEMU runs: probe a freshly created instance to "
    "tell the host from the instance"
)


def gl_verdict(obs: LaunchObservation, node: str) -> tuple[GlHost, str]:
    """What the GL launch on *node* showed: the verdict and its evidence. Raises nothing.

    Set up means all of: QEMU started (the device realized with ``display=on`` under
    ``egl-headless``), a console is linked to the device, and ``screendump`` answered.
    """
    launch = f"QEMU with -display egl-headless,rendernode={node}"
    if obs.end is LaunchEnd.CRASHED:
        return GlHost.CRASHED, (
            f"GL path crashed: {launch} {describe_status(obs.exit_status)}; the device's other "
            f"answers stand. {GL_CRASH_CAUSE}"
        )
    if obs.end is LaunchEnd.TIMEOUT:
        return GlHost.FAILED, f"{launch} did not finish in time and was killed"
    failure = first_failure(f"{obs.stderr}\n{obs.qmp_error}")
    if not obs.started or obs.end is not LaunchEnd.QUIT:
        if failure is not None:
            return GlHost.FAILED, f"{launch} refused the display: {failure.line}"
        lines = excerpt(f"{obs.stderr}\n{obs.qmp_error}".strip()).splitlines()
        why = f": {lines[-1]}" if lines else ""
        return GlHost.FAILED, f"{launch} {describe_status(obs.exit_status)}{why}"
    console = linked_console(obs.consoles, DEVICE_QOM_PATH)
    if console is None:
        return GlHost.FAILED, f"{launch} started, but no console is linked to the device"
    shot = obs.screendump
    if shot is None or not shot.answered:
        why = shot.error if shot is not None else "screendump was not asked"
        return GlHost.FAILED, f"{launch} started and linked {console} to the device, but {why}"
    return GlHost.SET_UP, (
        f"GL display set up on {node}: QEMU realized the device with display=on under "
        f"-display egl-headless, {console} is linked to it and screendump answered with "
        f"{shot.describe()}; {GL_LIMIT}"
    )


def _with_gl_answer(verdict: Verdict, gl_host: GlHost, node: str, detail: str) -> Verdict:
    caps = verdict.capabilities
    if caps is None:
        return verdict
    answer = replace(caps, gl_host=gl_host, gl_render_node=node, gl_detail=detail)
    return replace(verdict, capabilities=answer)


def _configuration(attempt: Attempt) -> Configuration:
    """The migration configuration a launch's settings stand for."""
    settings = attempt.settings
    if settings is not None and settings.device_dirty_tracking is False:
        return Configuration.OPTIONS
    return Configuration.DEFAULTS


def describe_status(status: int | None) -> str:
    """``exited with status 1`` / ``was killed by SIGSYS`` / ``ended``. Raises nothing."""
    if status is None:
        return "ended"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        hint = " (a seccomp sandbox violation)" if -status == signal.SIGSYS else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {status}"


def _strip_option_prefix(line: str) -> str:
    """Drop ``qemu-system-x86_64: -device vfio-pci,...: `` in front of a realize error."""
    if ": -device " in line:
        _, _, rest = line.partition(": -device ")
        _, sep, message = rest.partition(": ")
        return message if sep else line
    return line
