"""The host's GL answer for a dma-buf display, from what the GL launch on a render node showed."""

from __future__ import annotations

from dataclasses import replace

from ..capabilities import GlHost
from .evidence import describe_status, linked_console
from .messages import excerpt, first_failure
from .observation import LaunchEnd, LaunchObservation, Verdict
from .plan import DEVICE_QOM_PATH

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


def with_gl_answer(verdict: Verdict, gl_host: GlHost, node: str, detail: str) -> Verdict:
    caps = verdict.capabilities
    if caps is None:
        return verdict
    answer = replace(caps, gl_host=gl_host, gl_render_node=node, gl_detail=detail)
    return replace(verdict, capabilities=answer)
