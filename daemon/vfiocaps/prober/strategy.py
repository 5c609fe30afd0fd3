"""Pure probe decisions: which launch comes next, from what the launches so far showed.

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

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ..capabilities import Capabilities, Display, GlHost, ProbeOutcome
from .evidence import describe_status, device_blockers, display_from_consoles, strip_option_prefix
from .glverdict import gl_verdict, with_gl_answer
from .messages import Meaning, excerpt, findings, first_failure
from .migration import (
    DEVICE_DIRTY_TRACKING,
    ENABLE_MIGRATION,
    LOADED_RUNSTATES,
    TRACKING_OFF_OPTIONS,
    Configuration,
    KernelMigrationFacts,
    MigrationLedger,
    destination_error,
    migration_conditions,
)
from .observation import Attempt, LaunchEnd, LaunchObservation, Step, Verdict
from .plan import DEVICE_QOM_PATH, Accel, DeviceSettings, OnOffAuto
from .render import RenderAccess

MAX_LAUNCHES = 6  # a KVM retry, discover, display-off, tracking-off, load, gl


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
            know.ledger.refuse(_configuration(attempt), strip_option_prefix(failure.line))
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
            return with_gl_answer(verdict, GlHost.NOT_NEEDED, "", "")
        if render is None:
            return verdict  # not asked to check this host
        node = str(render.node) if render.node is not None else ""
        if render.node is None:
            detail = f"{render.reason}: QEMU cannot give the dma-buf display OpenGL on this host"
            return with_gl_answer(verdict, GlHost.NO_RENDER_NODE, node, detail)
        if not render.usable:
            return with_gl_answer(verdict, GlHost.INACCESSIBLE, node, render.reason)
        if self.launches >= MAX_LAUNCHES:
            detail = f"not checked: no launch left after {self.launches}"
            return with_gl_answer(verdict, GlHost.UNKNOWN, node, detail)
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
        answer = with_gl_answer(before, gl_host, node, detail)
        shot = obs.screendump
        if answer.capabilities is None or shot is None or not shot.answered or not shot.width:
            return answer
        size = f"{shot.width}x{shot.height}"
        return replace(answer, capabilities=replace(answer.capabilities, display_size=size))

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


def _configuration(attempt: Attempt) -> Configuration:
    """The migration configuration a launch's settings stand for."""
    settings = attempt.settings
    if settings is not None and settings.device_dirty_tracking is False:
        return Configuration.OPTIONS
    return Configuration.DEFAULTS
