"""The GL launch's verdicts against QEMU 10's answers: set up, no render node, crashed, refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.prober import load_fixture
from vfiocaps.capabilities import Display, GlHost, Migration, ProbeOutcome
from vfiocaps.prober.gldisplay import Screendump, ppm_size
from vfiocaps.prober.launch import blocked_reasons, console_names
from vfiocaps.prober.observation import Attempt, LaunchEnd, LaunchObservation, Step, Verdict
from vfiocaps.prober.plan import Accel, OnOffAuto, ProbePlan, build_qemu_argv
from vfiocaps.prober.render import NOT_ACCESSIBLE, RenderAccess
from vfiocaps.prober.strategy import MAX_LAUNCHES, ProbeStrategy

SAMPLES = load_fixture("qemu-10.0.13-mdev-samples.json")
GL = load_fixture("qemu-10.0.13-mbochs-gl.json")
MBOCHS = SAMPLES["devices"]["mbochs"]
NODE = Path(GL["render_node"])
RENDER_GID = 992


def observation(attempt: Attempt, launch: dict[str, Any]) -> LaunchObservation:
    """What the prober sees of one launch, from its transcript."""
    qmp = launch["qmp"]
    consoles = {
        name: qmp[f"qom-get /backend/{name} device"]
        for name in console_names(qmp.get("qom-list /backend", []))
    }
    shot = None
    if "screendump" in qmp:
        answer = qmp["screendump"]
        if "error" in answer:
            shot = Screendump(False, error=f"screendump: {answer['error']['desc']}")
        else:
            size = ppm_size(answer["ppm_header"].encode())
            assert size is not None
            shot = Screendump(True, *size)
    status = launch["exit_status"]
    if status < 0:
        end = LaunchEnd.CRASHED
    elif launch["started"]:
        end = LaunchEnd.QUIT
    else:
        end = LaunchEnd.EXITED
    return LaunchObservation(
        attempt=attempt,
        end=end,
        started=launch["started"],
        exit_status=status,
        stderr=launch["stderr"],
        consoles=consoles,
        blocked_reasons=blocked_reasons(qmp.get("query-migrate")),
        screendump=shot,
        qemu_version=GL["qemu_version"],
    )


def until_gl(render: RenderAccess | None) -> tuple[ProbeStrategy, Attempt | Verdict]:
    """Replay the recorded mbochs launches; return what the strategy wants next."""
    strategy = ProbeStrategy(
        vfio_pci_properties=frozenset(SAMPLES["vfio_pci_properties"]),
        accel=Accel.KVM,
        device_names=(MBOCHS["uuid"],),
        render=render,
    )
    decision: Attempt | Verdict = strategy.first()
    for launch in MBOCHS["launches"]:
        assert isinstance(decision, Attempt)
        decision = strategy.next(observation(decision, launch))
    return strategy, decision


def gl_verdict(launch: str) -> Verdict:
    strategy, attempt = until_gl(RenderAccess(NODE, True, group=RENDER_GID))
    assert isinstance(attempt, Attempt)
    verdict = strategy.next(observation(attempt, GL["launches"][launch]))
    assert isinstance(verdict, Verdict)
    return verdict


def assert_device_answers_stand(verdict: Verdict) -> None:
    assert verdict.outcome is ProbeOutcome.OK
    caps = verdict.capabilities
    assert caps is not None
    assert (caps.display, caps.gl_required, caps.migration) == (
        Display.DMABUF,
        True,
        Migration.UNSUPPORTED,
    )
    assert caps.migration_blockers == tuple(MBOCHS["expect"]["blockers"])


def test_the_gl_launch_is_display_on_under_egl_headless_with_the_nodes_group() -> None:
    _, attempt = until_gl(RenderAccess(NODE, True, group=RENDER_GID))
    assert isinstance(attempt, Attempt)
    assert attempt.step is Step.GL
    assert attempt.render_node == NODE
    assert attempt.groups == (RENDER_GID,)
    assert attempt.settings is not None
    assert attempt.settings.display is OnOffAuto.ON
    assert attempt.settings.migration is OnOffAuto.OFF  # migration is known; keep it out
    argv = build_qemu_argv(
        Path("/usr/bin/qemu-system-x86_64"),
        ProbePlan(
            machine="q35",
            accel=attempt.accel,
            vm_uuid="u",
            qmp_fd=3,
            sysfsdev=Path("/sys/bus/mdev/devices") / MBOCHS["uuid"],
            settings=attempt.settings,
            render_node=attempt.render_node,
        ),
    )
    assert argv[argv.index("-display") + 1] == f"egl-headless,rendernode={NODE}"
    assert "display=on,enable-migration=off" in argv[argv.index("-device") + 1]


def test_a_world_accessible_node_needs_no_group() -> None:
    _, attempt = until_gl(RenderAccess(NODE, True))
    assert isinstance(attempt, Attempt)
    assert attempt.groups == ()


def test_set_up_means_realized_linked_and_a_screendump_that_answers() -> None:
    verdict = gl_verdict("set-up")
    assert_device_answers_stand(verdict)
    caps = verdict.capabilities
    assert caps is not None
    assert caps.gl_host is GlHost.SET_UP
    assert caps.gl_render_node == str(NODE)
    assert caps.gl_detail.startswith(f"GL display set up on {NODE}: ")
    assert "console[0] is linked to it" in caps.gl_detail
    assert "a 640x480 image" in caps.gl_detail
    assert "a guest's frames are not proven" in caps.gl_detail
    assert caps.display_size == "640x480"


def test_a_crash_on_the_gl_path_is_the_gl_answer_not_the_devices() -> None:
    verdict = gl_verdict("used-instance")
    assert_device_answers_stand(verdict)
    assert verdict.error == ""
    caps = verdict.capabilities
    assert caps is not None
    assert caps.gl_host is GlHost.CRASHED
    assert "GL path crashed" in caps.gl_detail
    assert "was killed by SIGSEGV" in caps.gl_detail
    assert "freshly created instance" in caps.gl_detail
    assert caps.display_size == ""  # no screendump answered


def test_qemus_render_node_refusal_is_a_failed_gl_answer() -> None:
    verdict = gl_verdict("no-render-node")
    assert_device_answers_stand(verdict)
    caps = verdict.capabilities
    assert caps is not None
    assert caps.gl_host is GlHost.FAILED
    assert "egl: no drm render node available" in caps.gl_detail


def test_a_screendump_without_a_surface_is_not_set_up() -> None:
    verdict = gl_verdict("no-surface")
    assert_device_answers_stand(verdict)
    caps = verdict.capabilities
    assert caps is not None
    assert caps.gl_host is GlHost.FAILED
    assert "linked console[0] to the device, but screendump: no surface" in caps.gl_detail


def test_no_console_linked_is_not_set_up() -> None:
    launch = dict(
        GL["launches"]["set-up"], qmp={"screendump": GL["launches"]["set-up"]["qmp"]["screendump"]}
    )
    strategy, attempt = until_gl(RenderAccess(NODE, True, group=RENDER_GID))
    assert isinstance(attempt, Attempt)
    verdict = strategy.next(observation(attempt, launch))
    assert isinstance(verdict, Verdict)
    assert verdict.capabilities is not None
    assert verdict.capabilities.gl_host is GlHost.FAILED
    assert "no console is linked to the device" in verdict.capabilities.gl_detail


def test_without_a_render_node_there_is_no_gl_launch() -> None:
    reason = "no DRM render node in /dev/dri"
    strategy, verdict = until_gl(RenderAccess(None, False, reason=reason))
    assert isinstance(verdict, Verdict)
    assert_device_answers_stand(verdict)
    assert strategy.launches == len(MBOCHS["launches"])
    caps = verdict.capabilities
    assert caps is not None
    assert (caps.gl_host, caps.gl_render_node) == (GlHost.NO_RENDER_NODE, "")
    assert caps.gl_detail.startswith(reason)


def test_a_node_the_probe_user_cannot_open_is_reported_without_a_launch() -> None:
    reason = f"{NOT_ACCESSIBLE} ({NODE} is uid 0, gid 0, mode 0600)"
    _, verdict = until_gl(RenderAccess(NODE, False, reason=reason))
    assert isinstance(verdict, Verdict)
    caps = verdict.capabilities
    assert caps is not None
    assert (caps.gl_host, caps.gl_render_node, caps.gl_detail) == (
        GlHost.INACCESSIBLE,
        str(NODE),
        reason,
    )


def test_a_vm_taking_the_device_before_the_gl_launch_makes_the_probe_busy() -> None:
    strategy, attempt = until_gl(RenderAccess(NODE, True, group=RENDER_GID))
    assert isinstance(attempt, Attempt)
    busy = {
        "started": False,
        "exit_status": 1,
        "qmp": {},
        "stderr": SAMPLES["realize_errors"]["busy"],
    }
    verdict = strategy.next(observation(attempt, busy))
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.BUSY


def test_a_hung_gl_launch_is_a_failed_gl_answer() -> None:
    strategy, attempt = until_gl(RenderAccess(NODE, True, group=RENDER_GID))
    assert isinstance(attempt, Attempt)
    verdict = strategy.next(LaunchObservation(attempt, LaunchEnd.TIMEOUT, started=True))
    assert isinstance(verdict, Verdict)
    assert_device_answers_stand(verdict)
    assert verdict.capabilities is not None
    assert verdict.capabilities.gl_host is GlHost.FAILED
    assert "did not finish in time" in verdict.capabilities.gl_detail


def test_a_display_that_needs_no_gl_gets_no_gl_launch() -> None:
    strategy = ProbeStrategy(
        vfio_pci_properties=frozenset(SAMPLES["vfio_pci_properties"]),
        accel=Accel.KVM,
        device_names=("d",),
        render=RenderAccess(NODE, True, group=RENDER_GID),
    )
    mdpy = SAMPLES["devices"]["mdpy"]
    decision: Attempt | Verdict = strategy.first()
    for recorded in mdpy["launches"]:
        assert isinstance(decision, Attempt)
        decision = strategy.next(observation(decision, recorded))
    assert isinstance(decision, Verdict), decision
    assert decision.capabilities is not None
    assert decision.capabilities.gl_host is GlHost.NOT_NEEDED


def test_the_gl_launch_fits_within_the_launch_limit() -> None:
    """KVM retry, discover, display-off, tracking-off, load and GL: six launches at most."""
    strategy = ProbeStrategy(
        vfio_pci_properties=frozenset(SAMPLES["vfio_pci_properties"]),
        accel=Accel.KVM,
        device_names=("d",),
        render=RenderAccess(NODE, True, group=RENDER_GID),
    )
    strategy.launches = MAX_LAUNCHES - 1
    attempt = Attempt(Step.DISPLAY_OFF, strategy.first().settings, Accel.TCG)
    strategy.knowledge.display, strategy.knowledge.gl_required = Display.DMABUF, True
    strategy.knowledge.migration_settled = True
    verdict = strategy.next(LaunchObservation(attempt, LaunchEnd.QUIT, started=True, exit_status=0))
    assert isinstance(verdict, Verdict), "no seventh launch"
    assert verdict.capabilities is not None
    assert verdict.capabilities.gl_host is GlHost.UNKNOWN
    assert "not checked" in verdict.capabilities.gl_detail
