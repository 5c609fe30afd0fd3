"""The prober's decisions against transcripts: recorded from QEMU 7.2 here, and QEMU 10's texts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from support.prober import load_fixture
from vfiocaps.capabilities import Decider, Display, Migration, ProbeOutcome
from vfiocaps.prober.identity import parse_device_properties, parse_version
from vfiocaps.prober.launch import blocked_reasons, console_names, migration_result
from vfiocaps.prober.messages import Meaning, first_failure
from vfiocaps.prober.migration import (
    IncomingResult,
    KernelMigrationFacts,
    MigrationResult,
    migration_conditions,
)
from vfiocaps.prober.observation import Attempt, LaunchEnd, LaunchObservation, Step, Verdict
from vfiocaps.prober.plan import Accel, OnOffAuto
from vfiocaps.prober.strategy import ProbeStrategy

QEMU10 = load_fixture("qemu-10.0.13-mdev-samples.json")
QEMU72_PROPERTIES = frozenset({"display", "sysfsdev", "x-enable-migration", "xres", "yres"})


def qmp_reply(transcript: dict[str, Any], command: str) -> Any:
    """The (last) return value of *command* in a recorded QMP exchange."""
    replies = [entry for entry in transcript["qmp"] if entry["execute"] == command]
    assert replies, f"{command} not in transcript"
    return replies[-1].get("return", replies[-1].get("error"))


def recorded_observation(name: str, attempt: Attempt) -> LaunchObservation:
    transcript = load_fixture(name)
    started = transcript["greeting"] is not None
    status = transcript["exit_status"]
    if started:
        end = LaunchEnd.QUIT
    elif status < 0:
        end = LaunchEnd.CRASHED
    else:
        end = LaunchEnd.EXITED
    return LaunchObservation(
        attempt=attempt,
        end=end,
        started=started,
        exit_status=status,
        stderr=transcript["stderr"],
        qemu_version=parse_version(transcript["qemu_banner"]),
    )


def qemu10_observation(uuid: str, attempt: Attempt, launch: dict[str, Any]) -> LaunchObservation:
    qmp = launch["qmp"]
    consoles = {
        name: qmp[f"qom-get /backend/{name} device"]
        for name in console_names(qmp.get("qom-list /backend", []))
    }
    migrate = qmp.get("migrate")
    saved = migration_result(migrate, 0.2) if migrate else None
    if saved is not None and saved.status == "completed":
        # The launch keeps a completed stream for the load (the recording kept none).
        saved = dataclasses.replace(saved, stream_kept=True, stream_bytes=4096)
    return LaunchObservation(
        attempt=attempt,
        end=LaunchEnd.QUIT if launch["started"] else LaunchEnd.EXITED,
        started=launch["started"],
        exit_status=launch["exit_status"],
        stderr=launch["stderr"],
        consoles=consoles,
        blocked_reasons=blocked_reasons(qmp.get("query-migrate")),
        migration=saved,
        qemu_version=QEMU10["qemu_version"],
    )


def loaded(attempt: Attempt) -> LaunchObservation:
    """A destination that loaded the stream as QEMU reports it: completed, paused, realized.

    The recording has no load launch; this is the answer the strategy must accept.
    """
    return LaunchObservation(
        attempt=attempt,
        end=LaunchEnd.QUIT,
        started=True,
        exit_status=0,
        incoming=IncomingResult("completed", runstate="paused", realized=True, duration=0.05),
        qemu_version=QEMU10["qemu_version"],
    )


def settings_as_properties(attempt: Attempt) -> dict[str, str]:
    settings = attempt.settings
    assert settings is not None
    props = {"display": settings.display.value}
    if settings.migration is not None:
        props["enable-migration"] = settings.migration.value
    if settings.device_dirty_tracking is not None:
        props["x-device-dirty-page-tracking"] = "on" if settings.device_dirty_tracking else "off"
    return props


@pytest.mark.parametrize("device", sorted(QEMU10["devices"]))
def test_qemu10_sample_devices_classify_as_observed(device: str) -> None:
    case = QEMU10["devices"][device]
    strategy = ProbeStrategy(
        vfio_pci_properties=frozenset(QEMU10["vfio_pci_properties"]),
        accel=Accel.KVM,
        device_names=(case["uuid"],),
    )
    decision: Attempt | Verdict = strategy.first()
    for launch in case["launches"]:
        assert isinstance(decision, Attempt), f"stopped early: {decision}"
        assert decision.step.value == launch["step"]
        assert settings_as_properties(decision) == launch["device"]
        decision = strategy.next(qemu10_observation(case["uuid"], decision, launch))
    loads = 0
    if isinstance(decision, Attempt) and decision.step is Step.LOAD:
        loads = 1
        decision = strategy.next(loaded(decision))
    assert isinstance(decision, Verdict), f"wants another launch: {decision}"
    expect = case["expect"]
    assert decision.outcome.value == expect["outcome"]
    caps = decision.capabilities
    assert caps is not None
    assert caps.display.value == expect["display"]
    assert caps.gl_required is expect["gl_required"]
    assert caps.migration.value == expect["migration"]
    assert list(caps.migration_blockers) == expect["blockers"]
    assert caps.migration_with_options.value == expect["migration_with_options"]
    assert [list(pair) for pair in caps.migration_options] == expect["migration_options"]
    assert caps.migration_state_bytes == expect["state_bytes"]
    assert caps.qemu_version == "10.0.13"
    for fragment in expect["notes_contain"]:
        assert any(fragment in note for note in caps.migration_notes), caps.migration_notes
    assert loads == (1 if expect["migration_with_options"] == "supported" else 0)
    assert strategy.launches == len(case["launches"]) + loads


@pytest.mark.parametrize(
    ("key", "meaning"),
    [
        ("display-on-without-display", Meaning.NO_DISPLAY),
        ("migration-on-unsupported", Meaning.MIGRATION_UNSUPPORTED),
        ("busy", Meaning.BUSY),
        ("permission", Meaning.PERMISSION_DENIED),
        ("already-attached", Meaning.ALREADY_ATTACHED),
        ("dirty-tracking-blocker", Meaning.DIRTY_TRACKING_UNSUPPORTED),
    ],
)
def test_qemu10_realize_errors_are_known(key: str, meaning: Meaning) -> None:
    found = first_failure(QEMU10["realize_errors"][key])
    assert found is not None
    assert found.meaning is meaning


def test_qemu10_busy_at_realize_is_busy_and_stops() -> None:
    strategy = ProbeStrategy(
        vfio_pci_properties=frozenset(QEMU10["vfio_pci_properties"]),
        accel=Accel.KVM,
        device_names=("x",),
    )
    attempt = strategy.first()
    verdict = strategy.next(
        LaunchObservation(
            attempt,
            LaunchEnd.EXITED,
            started=False,
            exit_status=1,
            stderr=QEMU10["realize_errors"]["busy"],
        )
    )
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.BUSY
    assert "Device or resource busy" in verdict.error


def test_qemu72_device_help_has_no_enable_migration_so_it_is_not_passed() -> None:
    help_text = (
        "vfio-pci options:\n"
        '  display=<OnOffAuto>    - on/off/auto (default: "off")\n'
        "  sysfsdev=<str>\n"
        "  x-enable-migration=<bool> -  (default: false)\n"
    )
    properties = parse_device_properties(help_text)
    assert properties == {"display", "sysfsdev", "x-enable-migration"}
    strategy = ProbeStrategy(vfio_pci_properties=properties, accel=Accel.TCG, device_names=())
    first = strategy.first()
    assert first.settings is not None
    assert first.settings.display is OnOffAuto.AUTO
    assert first.settings.migration is None
    assert not strategy.can_disable_device_tracking


def test_qemu72_blocker_without_device_name_counts_as_the_device() -> None:
    strategy = ProbeStrategy(
        vfio_pci_properties=QEMU72_PROPERTIES, accel=Accel.KVM, device_names=("abc",)
    )
    attempt = strategy.first()
    verdict = strategy.next(
        LaunchObservation(
            attempt,
            LaunchEnd.QUIT,
            started=True,
            exit_status=0,
            blocked_reasons=("VFIO device doesn't support migration",),
        )
    )
    assert isinstance(verdict, Verdict)
    assert verdict.capabilities is not None
    assert verdict.capabilities.display is Display.NONE
    assert verdict.capabilities.migration is Migration.UNSUPPORTED


def test_recorded_qemu72_bare_session() -> None:
    transcript = load_fixture("recorded-7.2.22-bare-session.json")
    assert blocked_reasons(qmp_reply(transcript, "query-migrate")) == ()
    assert transcript["qmp"][1]["error"]["class"] == "DeviceNotFound"  # no /backend on 7.2
    first_query = next(e for e in transcript["qmp"] if e["execute"] == "query-migrate")
    assert migration_result(first_query["return"], 0.0) is None
    final = migration_result(qmp_reply(transcript, "query-migrate"), 0.01)
    assert final is not None
    assert final.status == "completed"
    assert final.device_bytes is None  # no vfio device, no vfio counter
    strategy = ProbeStrategy(vfio_pci_properties=frozenset(), accel=Accel.KVM, device_names=())
    observation = recorded_observation(
        "recorded-7.2.22-bare-session.json", Attempt(Step.BARE, None, Accel.KVM)
    )
    verdict = strategy.next(observation)
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.OK
    assert first_failure(transcript["stderr"]) is None  # the CPUID warning is benign


def test_recorded_qemu72_missing_device_fails_with_its_message() -> None:
    strategy = ProbeStrategy(
        vfio_pci_properties=QEMU72_PROPERTIES, accel=Accel.TCG, device_names=()
    )
    observation = recorded_observation("recorded-7.2.22-no-such-device.json", strategy.first())
    verdict = strategy.next(observation)
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.FAILED
    assert "no such host device" in verdict.error
    assert "no such host device" in verdict.stderr_excerpt


def test_recorded_qemu72_unknown_property_is_a_failure() -> None:
    strategy = ProbeStrategy(
        vfio_pci_properties=QEMU72_PROPERTIES, accel=Accel.TCG, device_names=()
    )
    observation = recorded_observation(
        "recorded-7.2.22-enable-migration-unknown.json", strategy.first()
    )
    verdict = strategy.next(observation)
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.FAILED
    assert "Property 'vfio-pci.enable-migration' not found" in verdict.error


def test_recorded_qemu72_kvm_refusal_retries_with_tcg_once() -> None:
    strategy = ProbeStrategy(
        vfio_pci_properties=QEMU72_PROPERTIES, accel=Accel.KVM, device_names=()
    )
    first = strategy.first()
    retry = strategy.next(recorded_observation("recorded-7.2.22-kvm-permission-denied.json", first))
    assert isinstance(retry, Attempt)
    assert retry.accel is Accel.TCG
    assert retry.settings == first.settings
    again = strategy.next(
        recorded_observation(
            "recorded-7.2.22-kvm-permission-denied.json",
            Attempt(first.step, first.settings, Accel.KVM),
        )
    )
    assert isinstance(again, Verdict)
    assert again.outcome is ProbeOutcome.FAILED


def test_recorded_qemu72_sandbox_violation_is_a_crash() -> None:
    strategy = ProbeStrategy(vfio_pci_properties=frozenset(), accel=Accel.TCG, device_names=())
    observation = recorded_observation(
        "recorded-7.2.22-sigsys-runas.json", Attempt(Step.BARE, None, Accel.TCG)
    )
    verdict = strategy.next(observation)
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.CRASHED
    assert "SIGSYS" in verdict.error


def test_gl_and_migration_refusals_need_no_third_launch() -> None:
    strategy = ProbeStrategy(
        vfio_pci_properties=frozenset(QEMU10["vfio_pci_properties"]),
        accel=Accel.KVM,
        device_names=("d",),
    )
    first = strategy.first()
    second = strategy.next(
        LaunchObservation(
            first,
            LaunchEnd.EXITED,
            started=False,
            exit_status=1,
            stderr="qemu-system-x86_64: -device vfio-pci,x: vfio d: vfio-display-dmabuf: "
            "opengl not available\n",
        )
    )
    assert isinstance(second, Attempt)
    assert second.step is Step.DISPLAY_OFF
    verdict = strategy.next(
        LaunchObservation(
            second,
            LaunchEnd.EXITED,
            started=False,
            exit_status=1,
            stderr="qemu-system-x86_64: -device vfio-pci,x: vfio d: d: VFIO migration is not "
            "supported in kernel\n",
        )
    )
    assert isinstance(verdict, Verdict)
    assert verdict.capabilities is not None
    assert verdict.capabilities.display is Display.DMABUF
    assert verdict.capabilities.migration_blockers == (
        "vfio d: d: VFIO migration is not supported in kernel",
    )


# -- the load side of the round trip ---------------------------------------------------------

MTTY = QEMU10["devices"]["mtty"]
LOAD_FAILURE_STDERR = (
    "qemu-system-x86_64: error while loading state for instance 0x0 of device "
    "'0000:00:02.0/vfio'\n"
    "qemu-system-x86_64: load of migration failed: Invalid argument\n"
)


def mtty_until_load(kernel: KernelMigrationFacts | None = None) -> tuple[ProbeStrategy, Attempt]:
    """Replay the recorded mtty launches up to the load the strategy asks for."""
    strategy = ProbeStrategy(
        vfio_pci_properties=frozenset(QEMU10["vfio_pci_properties"]),
        accel=Accel.KVM,
        device_names=(MTTY["uuid"],),
        kernel=kernel,
    )
    decision: Attempt | Verdict = strategy.first()
    for launch in MTTY["launches"]:
        assert isinstance(decision, Attempt)
        decision = strategy.next(qemu10_observation(MTTY["uuid"], decision, launch))
    assert isinstance(decision, Attempt)
    assert decision.step is Step.LOAD
    return strategy, decision


def test_the_load_uses_the_settings_that_saved() -> None:
    _, load = mtty_until_load()
    assert load.settings is not None
    assert load.settings.device_dirty_tracking is False
    assert load.settings.migration is OnOffAuto.ON


def test_a_state_that_saves_but_does_not_load_is_unsupported_with_the_destinations_error() -> None:
    strategy, load = mtty_until_load()
    verdict = strategy.next(
        LaunchObservation(
            attempt=load,
            end=LaunchEnd.EXITED,
            started=True,
            exit_status=1,
            stderr=LOAD_FAILURE_STDERR,
            qmp_error="QMP session lost: EOF",
            incoming=IncomingResult("active", duration=0.03),
        )
    )
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.OK
    caps = verdict.capabilities
    assert caps is not None
    assert caps.migration is Migration.UNSUPPORTED
    assert caps.migration_with_options is Migration.UNSUPPORTED
    assert caps.migration_options == ()  # they do not make it migrate
    assert any(
        "does not load" in note and "load of migration failed: Invalid argument" in note
        for note in caps.migration_notes
    ), caps.migration_notes
    assert caps.migration_load_seconds == pytest.approx(0.03)
    assert all(c.verdict is Migration.UNSUPPORTED for c in caps.migration_conditions)


@pytest.mark.parametrize(
    "incoming",
    [
        IncomingResult("failed", error="Unable to read from socket: Connection reset by peer"),
        IncomingResult("completed", runstate="inmigrate", realized=True),
        IncomingResult("completed", runstate="paused", realized=None),
        IncomingResult("completed", runstate="running", realized=True),
    ],
)
def test_a_destination_that_does_not_reach_paused_with_the_device_is_not_proven(
    incoming: IncomingResult,
) -> None:
    strategy, load = mtty_until_load()
    verdict = strategy.next(
        LaunchObservation(load, LaunchEnd.QUIT, started=True, exit_status=0, incoming=incoming)
    )
    assert isinstance(verdict, Verdict)
    assert verdict.capabilities is not None
    assert verdict.capabilities.migration_with_options is Migration.UNSUPPORTED


def test_a_destination_that_reports_a_load_error_is_not_proven_even_if_it_completed() -> None:
    strategy, load = mtty_until_load()
    verdict = strategy.next(
        LaunchObservation(
            load,
            LaunchEnd.QUIT,
            started=True,
            exit_status=0,
            stderr=LOAD_FAILURE_STDERR,
            incoming=IncomingResult("completed", runstate="paused", realized=True),
        )
    )
    assert isinstance(verdict, Verdict)
    assert verdict.capabilities is not None
    assert verdict.capabilities.migration_with_options is Migration.UNSUPPORTED
    assert any("load of migration failed" in n for n in verdict.capabilities.migration_notes)


def test_a_crashed_destination_is_a_load_failure_not_a_crashed_probe() -> None:
    strategy, load = mtty_until_load()
    verdict = strategy.next(
        LaunchObservation(load, LaunchEnd.CRASHED, started=True, exit_status=-11)
    )
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.OK
    assert verdict.capabilities is not None
    assert verdict.capabilities.migration_with_options is Migration.UNSUPPORTED
    assert any("SIGSEGV" in note for note in verdict.capabilities.migration_notes)


def test_a_destination_that_finds_the_device_busy_is_busy() -> None:
    strategy, load = mtty_until_load()
    verdict = strategy.next(
        LaunchObservation(
            load,
            LaunchEnd.EXITED,
            started=False,
            exit_status=1,
            stderr=QEMU10["realize_errors"]["busy"],
        )
    )
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is ProbeOutcome.BUSY


def test_a_stream_past_the_limit_is_not_proven_and_not_loaded() -> None:
    strategy = ProbeStrategy(
        vfio_pci_properties=frozenset(QEMU10["vfio_pci_properties"]),
        accel=Accel.KVM,
        device_names=("dev",),
    )
    first = strategy.first()
    verdict = strategy.next(
        LaunchObservation(
            first,
            LaunchEnd.QUIT,
            started=True,
            exit_status=0,
            migration=MigrationResult(
                "cancelled", stream_bytes=1 << 20, limit=1 << 20, limit_exceeded=True
            ),
        )
    )
    assert isinstance(verdict, Verdict), "no load for a stream that was not kept"
    assert verdict.capabilities is not None
    assert verdict.capabilities.migration is Migration.UNKNOWN
    assert any(
        f"state larger than {1 << 20} bytes: not proven" in note
        for note in verdict.capabilities.migration_notes
    )


def test_at_most_one_load_launch_per_probe() -> None:
    strategy, load = mtty_until_load()
    verdict = strategy.next(loaded(load))
    assert isinstance(verdict, Verdict)
    assert strategy.launches == len(MTTY["launches"]) + 1


def test_round_trip_times_and_size_are_reported() -> None:
    strategy, load = mtty_until_load()
    verdict = strategy.next(loaded(load))
    assert isinstance(verdict, Verdict)
    caps = verdict.capabilities
    assert caps is not None
    assert caps.migration_state_bytes == 60
    assert caps.migration_save_seconds == pytest.approx(0.2)
    assert caps.migration_load_seconds == pytest.approx(0.05)


def test_conditions_from_the_kernels_flags() -> None:
    facts = KernelMigrationFacts(
        observable=True, flags=("stop-copy", "p2p", "pre-copy"), dirty_tracking=True
    )
    strategy, load = mtty_until_load(facts)
    verdict = strategy.next(loaded(load))
    assert isinstance(verdict, Verdict)
    caps = verdict.capabilities
    assert caps is not None
    assert caps.migration_flags == ("stop-copy", "p2p", "pre-copy")
    assert caps.device_dirty_tracking is True
    # The kernel's probe says yes, QEMU's save says the log cannot be read: both are told.
    assert any("QEMU could not read the log" in note for note in caps.migration_notes)
    by_name = {c.condition: c for c in caps.migration_conditions}
    assert by_name["alone"].verdict is Migration.SUPPORTED
    assert "x-device-dirty-page-tracking=off" in by_name["alone"].reason
    assert by_name["alone"].decided_by is Decider.QEMU
    beside = by_name["beside other VFIO devices"]
    assert (beside.verdict, beside.decided_by) == (Migration.SUPPORTED, Decider.KERNEL)
    viommu = by_name["with a virtual IOMMU"]
    assert (viommu.verdict, viommu.decided_by) == (Migration.UNSUPPORTED, Decider.QEMU)


def test_conditions_without_p2p_or_without_the_kernels_answer() -> None:
    no_p2p = KernelMigrationFacts(observable=True, flags=("stop-copy",), dirty_tracking=False)
    strategy, load = mtty_until_load(no_p2p)
    verdict = strategy.next(loaded(load))
    assert isinstance(verdict, Verdict)
    assert verdict.capabilities is not None
    beside = {c.condition: c for c in verdict.capabilities.migration_conditions}[
        "beside other VFIO devices"
    ]
    assert (beside.verdict, beside.decided_by) == (Migration.UNSUPPORTED, Decider.KERNEL)
    hidden = KernelMigrationFacts(observable=False, reason="KVM is required to use Intel vGPU")
    strategy, load = mtty_until_load(hidden)
    verdict = strategy.next(loaded(load))
    assert isinstance(verdict, Verdict)
    assert verdict.capabilities is not None
    caps = verdict.capabilities
    assert caps.migration_flags == ()
    assert caps.device_dirty_tracking is None
    beside = {c.condition: c for c in caps.migration_conditions}["beside other VFIO devices"]
    assert beside.verdict is Migration.UNKNOWN
    assert "not observable (KVM is required to use Intel vGPU)" in beside.reason


@pytest.mark.parametrize(
    ("version", "verdict"),
    [
        ("10.0.13", Migration.UNSUPPORTED),
        ("8.1.0", Migration.UNSUPPORTED),
        ("8.0.5", Migration.UNKNOWN),
        ("10.1.0", Migration.UNKNOWN),
        ("", Migration.UNKNOWN),
    ],
)
def test_the_virtual_iommu_rule_is_applied_only_to_the_qemu_versions_that_have_it(
    version: str, verdict: Migration
) -> None:
    conditions = migration_conditions(Migration.SUPPORTED, (), version, None)
    viommu = {c.condition: c for c in conditions}["with a virtual IOMMU"]
    assert viommu.verdict is verdict
    assert viommu.decided_by is Decider.QEMU
