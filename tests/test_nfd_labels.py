"""node-feature-discovery labels: the feature file's names, values, size, and its upkeep."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from support.daemon_lab import Lab
from support.engine_rig import driver
from support.harness import BUS_NAME, ROOT_PATH, busctl, wait_until
from support.nfd_format import MAX_FILE_BYTES, expiry_time, label_problem, read_labels
from vfiocaps.capabilities import Capabilities, Display, GlHost, Migration
from vfiocaps.engine import TypeView
from vfiocaps.nfdfile import FeatureFile
from vfiocaps.nfdlabels import (
    EXPIRY_SECONDS,
    LABEL_PREFIX,
    NfdLabelWriter,
    fingerprint_label,
    labels_of,
    render,
    type_token,
)

P = LABEL_PREFIX + "/"
MTTY = Capabilities(
    display=Display.NONE,
    gl_required=False,
    migration=Migration.UNSUPPORTED,
    migration_options=(("x-device-dirty-page-tracking", "off"), ("enable-migration", "on")),
    migration_with_options=Migration.SUPPORTED,
)
MDPY = Capabilities(display=Display.REGION, gl_required=False, migration=Migration.UNSUPPORTED)
MBOCHS = Capabilities(
    display=Display.DMABUF,
    gl_required=True,
    migration=Migration.UNSUPPORTED,
    gl_host=GlHost.SET_UP,
    gl_render_node="/dev/dri/renderD128",
)


def type_view(parent: str, type_id: str, caps: Capabilities | None) -> TypeView:
    return TypeView(
        parent=parent,
        type_id=type_id,
        name=type_id,
        description="",
        device_api="vfio-pci",
        available_instances=1,
        instances=0,
        driver=None if caps is None else driver(parent),
        capabilities=caps,
    )


def test_labels_of_probed_types() -> None:
    types = [
        type_view("mtty", "mtty-1", MTTY),
        type_view("mdpy", "mdpy-xga", MDPY),
        type_view("mbochs", "mbochs-small", MBOCHS),
        type_view("mbochs", "mbochs-large", None),  # not probed: nothing to say
    ]
    assert labels_of(types) == {
        P + "mbochs-small.display": "dmabuf",
        P + "mbochs-small.gl-required": "true",
        P + "mbochs-small.gl-host": "set-up",
        P + "mbochs-small.migration": "unsupported",
        P + "mbochs-small.migration-with-options": "unsupported",
        P + "mdpy-xga.display": "region",
        P + "mdpy-xga.gl-required": "false",
        P + "mdpy-xga.migration": "unsupported",
        P + "mdpy-xga.migration-with-options": "unsupported",
        P + "mtty-1.display": "none",
        P + "mtty-1.gl-required": "false",
        P + "mtty-1.migration": "unsupported",
        P + "mtty-1.migration-with-options": "supported",
    }


def test_an_emulated_host_says_so() -> None:
    labels = labels_of([type_view("mtty", "mtty-1", MTTY)], emulated=True)
    assert labels[P + "emulated"] == "true"
    assert P + "emulated" not in labels_of([type_view("mtty", "mtty-1", MTTY)])
    for key, value in labels.items():
        assert label_problem(key, value) is None


def test_fingerprint_hook_and_parents_that_disagree() -> None:
    types = [
        type_view("0000:65:00.0", "nvidia-474", MDPY),
        type_view("0000:66:00.0", "nvidia-474", MBOCHS),
        type_view("mtty", "mtty-1", MTTY),
    ]
    fingerprints = {"mtty-1": "mtty|0.1|mtty-1|stop-copy,p2p"}
    labels = labels_of(types, lambda view: fingerprints.get(view.type_id, ""))
    assert labels[P + "nvidia-474.display"] == "mixed"
    assert labels[P + "nvidia-474.gl-required"] == "mixed"
    assert labels[P + "nvidia-474.migration"] == "unsupported"
    assert P + "nvidia-474.migration-fingerprint" not in labels
    short = labels[P + "mtty-1.migration-fingerprint"]
    assert short == fingerprint_label(fingerprints["mtty-1"])
    assert len(short) == 12


@pytest.mark.parametrize(
    "type_id",
    ["10de:2236", "i915-GVTg_V5_4", "-odd-", "x" * 80, "ü", ":", "nvidia-474"],
)
def test_every_type_id_gives_valid_distinct_names(type_id: str) -> None:
    token = type_token(type_id)
    assert token != type_token(type_id + "x")
    caps = Capabilities(
        display=Display.REGION,
        gl_required=False,
        migration=Migration.SUPPORTED,
        migration_options=(("enable-migration", "on"),),
    )
    labels = labels_of([type_view("p", type_id, caps)], lambda _view: "fingerprint")
    assert len(labels) == 5
    for key, value in labels.items():
        assert label_problem(key, value) is None, key


@pytest.mark.parametrize("gl_host", list(GlHost))
def test_the_gl_answer_is_a_valid_label_for_a_type_that_needs_gl(gl_host: GlHost) -> None:
    caps = replace(MBOCHS, gl_host=gl_host)
    labels = labels_of([type_view("p", "x" * 80, caps), type_view("mdpy", "mdpy-xga", MDPY)])
    gl_labels = {key: value for key, value in labels.items() if key.endswith(".gl-host")}
    assert list(gl_labels.values()) == [gl_host.value]  # none for a type that needs no GL
    for key, value in labels.items():
        assert label_problem(key, value) is None, key


def test_the_checker_refuses_what_nfd_refuses() -> None:
    assert label_problem("mtty-1.display", "none") == "no namespace"
    assert label_problem("kubernetes.io/x", "y") is not None
    assert label_problem("node.kubernetes.io/x", "y") is not None
    assert label_problem("a.feature.node.kubernetes.io/x", "y") is None
    assert label_problem("vendor.io/" + "x" * 64, "y") is not None
    assert label_problem("vendor.io/x", "two words") is not None
    assert label_problem("Vendor.io/x", "y") is not None
    assert label_problem("vendor.io/x", "") is None


def test_many_types_stay_within_the_size_limit(tmp_path: Path) -> None:
    types = [type_view("p", f"nvidia-{n}", MTTY) for n in range(3000)]
    text, left_out = render(labels_of(types))
    assert len(text.encode()) <= MAX_FILE_BYTES
    assert left_out > 0
    feature_file = FeatureFile(tmp_path)
    feature_file.write(text)
    labels = read_labels(feature_file.path)
    # Types are kept whole: four labels each.
    assert len(labels) == 4 * (3000 - left_out)


async def test_writer_writes_changes_and_removes(tmp_path: Path) -> None:
    types = [type_view("mtty", "mtty-1", MTTY)]
    directory = tmp_path / "features.d"
    writer = NfdLabelWriter(FeatureFile(directory), lambda: list(types), settle=0)
    path = directory / "vfiocaps"
    await writer.update()
    assert read_labels(path)[P + "mtty-1.migration"] == "unsupported"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    first = path.stat().st_ino

    await writer.update()  # nothing changed: the file is left alone
    assert path.stat().st_ino == first

    types.append(type_view("mdpy", "mdpy-xga", MDPY))
    await writer.update()
    assert read_labels(path)[P + "mdpy-xga.display"] == "region"
    assert path.stat().st_ino != first

    types.clear()
    await writer.update()
    assert read_labels(path) == {}
    assert sorted(os.listdir(directory)) == ["vfiocaps"]  # no dot-file left behind


async def test_a_restarted_writer_renews_the_expiry_of_an_equal_file(tmp_path: Path) -> None:
    types = [type_view("mtty", "mtty-1", MTTY)]
    clock = [1_800_000_000.0]
    await NfdLabelWriter(FeatureFile(tmp_path), lambda: types, clock=lambda: clock[0]).update()
    first = expiry_time(tmp_path / "vfiocaps")
    assert first is not None
    assert first.timestamp() == clock[0] + EXPIRY_SECONDS
    clock[0] += 60
    await NfdLabelWriter(FeatureFile(tmp_path), lambda: types, clock=lambda: clock[0]).update()
    renewed = expiry_time(tmp_path / "vfiocaps")
    assert renewed is not None
    assert renewed.timestamp() == clock[0] + EXPIRY_SECONDS


async def test_a_link_left_as_the_dot_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    directory = tmp_path / "features.d"
    directory.mkdir()
    (directory / ".vfiocaps").symlink_to(victim)
    await NfdLabelWriter(FeatureFile(directory), lambda: [type_view("m", "mtty-1", MTTY)]).update()
    assert victim.read_text() == "precious\n"
    assert not (directory / "vfiocaps").is_symlink()
    assert read_labels(directory / "vfiocaps")


def test_the_daemon_keeps_the_labels_in_step(lab: Lab) -> None:
    features = lab.directory / "features.d"
    lab.host.build("samples")
    daemon = lab.start(f"--nfd-labels={features}")
    path = features / "vfiocaps"
    mtty = lab.host.add_instance("mtty", "mtty-1")
    mdpy = lab.host.add_instance("mdpy", "mdpy-xga")
    lab.wait_states({mtty: "done", mdpy: "done"})

    def labels() -> dict[str, str]:
        return read_labels(path) if path.exists() else {}

    wait_until(
        lambda: {P + "mdpy-xga.display", P + "mtty-1.display"} <= labels().keys(),
        20,
        "the labels of both types",
    )
    assert labels()[P + "mdpy-xga.display"] == "region"
    assert labels()[P + "mtty-1.display"] == "none"
    assert re.fullmatch(r"[0-9a-f]{12}", labels()[P + "mtty-1.migration-fingerprint"])
    assert (
        labels()[P + "mtty-1.migration-fingerprint"]
        != labels()[P + "mdpy-xga.migration-fingerprint"]
    )
    assert not any("mbochs" in key for key in labels())  # no mbochs type probed yet
    written = path.stat().st_ino

    # Another instance of a known type: the answers stay, and so does the file.
    second = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({second: "done"})
    assert path.stat().st_ino == written

    # The answer changes: the driver now shows a region display for mtty-1.
    lab.overrides({"devices": {mtty: {"profile": "mdpy"}}})
    busctl(lab.bus.address, "call", BUS_NAME, ROOT_PATH, "org.vfiocaps1.Manager", "Refresh",
           "s", mtty, timeout=120)  # fmt: skip
    wait_until(lambda: labels().get(P + "mtty-1.display") == "region", 20, "the new answer")

    # The parent goes: its types are no longer on the node.
    lab.host.unregister_parent("mdpy")
    wait_until(lambda: P + "mdpy-xga.display" not in labels(), 20, "mdpy's labels to go")
    assert labels()[P + "mtty-1.display"] == "region"
    assert "Traceback" not in daemon.log()


async def test_an_unwritable_directory_is_reported_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    types = [type_view("mtty", "mtty-1", MTTY)]
    writer = NfdLabelWriter(FeatureFile(blocked), lambda: list(types))
    with caplog.at_level(logging.DEBUG, logger="vfiocaps.nfdlabels"):
        await writer.update()
        await writer.update()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot write the NFD feature file" in warnings[0].getMessage()
    blocked.unlink()
    await writer.update()
    assert read_labels(blocked / "vfiocaps")[P + "mtty-1.display"] == "none"
