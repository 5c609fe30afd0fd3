"""The one rule for each piece of knowledge: names, sysfs writes, atomic replace, task sets,
what "probed" means."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
from pathlib import Path

import pytest

from support.engine_rig import driver, mdev
from vfiocaps import fingerprint, hostpaths
from vfiocaps.bus.validation import parse_type_name
from vfiocaps.capabilities import Capabilities, Display, Migration
from vfiocaps.discovery.attributes import AttributeWriteError, write_attribute
from vfiocaps.discovery.instances import InstanceError, create_instance
from vfiocaps.discovery.sysfs import SysfsTree
from vfiocaps.domainxml import Viewer
from vfiocaps.engine import DeviceView, ProbeState
from vfiocaps.engine.domain import DomainAnswers
from vfiocaps.engine.views import answer_of
from vfiocaps.errors import InvalidArgumentError, ProbeBusyError, ProbeError
from vfiocaps.ids import MAX_NAME_LENGTH, is_sysfs_name, name_problem
from vfiocaps.model import Parent
from vfiocaps.nfdlabels import type_token
from vfiocaps.statefile import replace_at, replace_file
from vfiocaps.tasks import TaskSet

# ---- names: one rule for sysfs, callers and instances ----------------------------------------

TAKEN = ["mtty-1", "nvidia-592", "i915-GVTg_V5_4", "type~1", "vgpu (A)", "_x", "a" * 128, "é"]
REFUSED = ["", ".", "..", "a/b", "../mtty", "bad\nname", "tab\there", "nul\0", "a" * 129]


@pytest.mark.parametrize("name", TAKEN)
def test_a_printable_single_component_name_is_taken_everywhere(name: str) -> None:
    assert name_problem(name) is None
    assert is_sysfs_name(name)
    assert parse_type_name("mtty", name) == ("mtty", name)
    assert parse_type_name(name, "mtty-1") == (name, "mtty-1")


@pytest.mark.parametrize("name", REFUSED)
def test_a_name_unsafe_as_a_path_component_is_refused_everywhere(name: str, tmp_path: Path) -> None:
    problem = name_problem(name)
    assert problem is not None
    assert not is_sysfs_name(name)
    with pytest.raises(InvalidArgumentError, match="ListTypes") as caught:
        parse_type_name("mtty", name)
    assert problem in str(caught.value)
    parent = Parent("mtty", tmp_path / "devices/virtual/mtty/mtty", "mtty", None)
    with pytest.raises(InstanceError, match="not an mdev type id"):
        create_instance(tmp_path, parent, name, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")


def test_every_valid_type_id_has_its_own_nfd_label_token() -> None:
    """NFD labels render the ids the rule takes (a label name is narrower): never one token
    for two types, each a valid label name."""
    label_name = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    tokens = [type_token(name) for name in TAKEN]
    assert len(set(tokens)) == len(TAKEN)
    assert all(label_name.fullmatch(token) and len(token) <= 63 for token in tokens), tokens


def test_the_length_limit_is_the_rules_own() -> None:
    assert name_problem("a" * MAX_NAME_LENGTH) is None
    assert "longer" in (name_problem("a" * (MAX_NAME_LENGTH + 1)) or "")


# ---- sysfs writes: one writer --------------------------------------------------------------


def _attribute(tmp_path: Path) -> tuple[SysfsTree, Path]:
    directory = tmp_path / "devices" / "x"
    directory.mkdir(parents=True)
    attribute = directory / "create"
    attribute.write_text("old contents\n")
    return SysfsTree(tmp_path), attribute


def test_the_writer_truncates_and_writes_once(tmp_path: Path) -> None:
    tree, attribute = _attribute(tmp_path)
    write_attribute(tree, attribute, "1")
    assert attribute.read_text() == "1"


def test_the_writer_never_creates_an_attribute(tmp_path: Path) -> None:
    tree, attribute = _attribute(tmp_path)
    with pytest.raises(AttributeWriteError, match="does not exist") as caught:
        write_attribute(tree, attribute.with_name("remove"), "1")
    assert not caught.value.refused
    assert not attribute.with_name("remove").exists()


def test_the_writer_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    tree, attribute = _attribute(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    attribute.unlink()
    attribute.symlink_to(victim)
    with pytest.raises(AttributeWriteError, match="a link") as caught:
        write_attribute(tree, attribute, "1")
    assert caught.value.errno == errno.ELOOP
    assert victim.read_text() == "precious\n"


def test_the_writer_does_not_leave_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    (root / "devices").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "create").write_text("")
    (root / "devices" / "x").symlink_to(outside)
    with pytest.raises(AttributeWriteError, match="outside"):
        write_attribute(SysfsTree(root), root / "devices" / "x" / "create", "1")
    assert (outside / "create").read_text() == ""


def test_a_refusal_of_the_kernel_keeps_its_errno() -> None:
    """``/dev/full`` refuses every write with ENOSPC, as a driver refuses a value."""
    tree = SysfsTree(Path("/"))
    with pytest.raises(AttributeWriteError) as caught:
        write_attribute(tree, Path("/dev/full"), "1")
    assert caught.value.refused
    assert caught.value.errno == errno.ENOSPC
    assert "ENOSPC" in str(caught.value)


# ---- atomic replace: one helper ---------------------------------------------------------------


def test_replace_writes_the_new_content_with_its_mode_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "record"
    path.write_text("old")
    replace_file(path, "new", 0o640)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["record"]


def test_replace_at_goes_through_the_directory_descriptor(tmp_path: Path) -> None:
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        replace_at(directory, "labels", b"a=b\n", 0o644)
    finally:
        os.close(directory)
    assert (tmp_path / "labels").read_bytes() == b"a=b\n"
    assert stat.S_IMODE((tmp_path / "labels").stat().st_mode) == 0o644


def test_replace_does_not_write_through_a_link_at_the_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "record").symlink_to(victim)
    replace_file(tmp_path / "record", "new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "record").is_symlink()


def test_a_failed_replace_keeps_the_old_content_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "record"
    path.write_text("old")
    (tmp_path / "sub").mkdir()
    with pytest.raises(IsADirectoryError):
        replace_file(tmp_path / "sub", "new")  # a directory cannot be replaced by a file
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["record", "sub"]


def test_replace_flushes_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    replace_file(tmp_path / "record", "new")
    assert synced == [False, True]


# ---- host paths: one module of defaults -------------------------------------------------------


def test_every_default_host_path_comes_from_hostpaths() -> None:
    """No module but hostpaths spells a host path as a default."""
    package = Path(hostpaths.__file__).parent
    spelled = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "hostpaths.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for root in ('"/sys', '"/dev', '"/lib/modules', '"/proc', '"/run/'):
                if f"Path({root}" in line:
                    spelled.append(f"{path.relative_to(package)}:{number}")
    assert spelled == []


def test_the_config_and_the_prober_default_to_the_same_roots() -> None:
    from vfiocaps.config import Config

    config = Config()
    assert config.sysfs_root == hostpaths.SYSFS_ROOT
    assert config.dev_root == hostpaths.DEV_ROOT
    assert config.modules_root == hostpaths.MODULES_ROOT
    assert config.runtime_dir == hostpaths.RUNTIME_DIR


# ---- background tasks: one TaskSet ------------------------------------------------------------


async def test_the_task_set_keeps_cancels_and_awaits_its_tasks() -> None:
    tasks = TaskSet("test")
    ended: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("forever")

    async def quick() -> None:
        ended.append("quick")

    tasks.spawn(forever(), name="forever")
    tasks.spawn(quick(), name="quick")
    assert len(tasks) == 2
    await tasks.settle(0.5)
    assert ended == ["quick"]
    assert len(tasks) == 1
    await tasks.stop()
    assert ended == ["quick", "forever"]
    assert len(tasks) == 0


async def test_stopping_the_task_set_does_not_swallow_the_callers_cancellation() -> None:
    tasks = TaskSet("test")

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)
            raise

    tasks.spawn(stubborn())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(tasks.stop())
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper


# ---- domain answers: decided in the engine ---------------------------------------------------


def _caps(display: Display) -> Capabilities:
    return Capabilities(
        display=display,
        gl_required=display is Display.DMABUF,
        migration=Migration.SUPPORTED,
        qemu_version="10.0.13",
    )


def _view(type_id: str, module: str = "mtty", state: ProbeState = ProbeState.DONE) -> DeviceView:
    probed = state is ProbeState.DONE
    return DeviceView(
        device=mdev("mtty", type_id),
        driver=driver(module),
        type_name=type_id,
        state=state,
        capabilities=_caps(Display.REGION) if probed else None,
    )


def test_migration_candidates_are_probed_devices_of_the_sources_driver_and_type(
    tmp_path: Path,
) -> None:
    same, other_type = _view("mtty-2"), _view("mtty-1")
    other_driver, unprobed = _view("mtty-2", "mdpy"), _view("mtty-2", state=ProbeState.PENDING)
    views = [same, other_type, other_driver, unprobed]
    answers = DomainAnswers(lambda: views, tmp_path, emulated=False)
    source = answers.fingerprint(same)
    assert answers.candidates(source) == [same]
    verdict, reasons = answers.check(source)
    assert verdict == "compatible"
    assert reasons[0] == ("destination", "compatible", same.device.device_id)
    verdict, reasons = answers.check(source, [other_type])
    assert verdict != "compatible"
    lonely = DomainAnswers(lambda: [other_type], tmp_path, emulated=False)
    verdict, reasons = lonely.check(source)
    assert verdict == fingerprint.UNKNOWN
    assert "no probed device of type mtty-2" in reasons[0][2]


def test_an_unprobed_or_busy_device_has_no_domain_answer(tmp_path: Path) -> None:
    answers = DomainAnswers(list, tmp_path, emulated=False)
    with pytest.raises(ProbeBusyError):
        answers.parts(_view("mtty-1", state=ProbeState.BUSY), Viewer.REMOTE)
    with pytest.raises(ProbeError, match="no capabilities"):
        answers.fingerprint(_view("mtty-1", state=ProbeState.PENDING))


def test_the_render_node_is_looked_up_on_each_call(tmp_path: Path) -> None:
    view = _view("mtty-1")
    view = DeviceView(
        device=view.device,
        driver=view.driver,
        type_name="x",
        state=ProbeState.DONE,
        capabilities=_caps(Display.DMABUF),
    )
    answers = DomainAnswers(list, tmp_path, emulated=False)
    assert "renderD128" not in answers.parts(view, Viewer.REMOTE).fragment()
    (tmp_path / "dri").mkdir()
    (tmp_path / "dri" / "renderD128").touch()
    assert "renderD128" in answers.parts(view, Viewer.REMOTE).fragment()


# ---- "probed": one rule for the engine, the bus, the labels and the domain answers ----------


def test_a_view_is_answered_only_with_capabilities_and_the_driver_they_came_from() -> None:
    done = _view("mtty-1")
    assert done.answer is not None
    assert done.answer.capabilities == done.capabilities
    assert done.answer.driver == done.driver
    assert _view("mtty-1", state=ProbeState.PENDING).answer is None
    without_driver = DeviceView(
        device=done.device,
        driver=None,
        type_name="mtty-1",
        state=ProbeState.DONE,
        capabilities=done.capabilities,
    )
    assert without_driver.answer is None
    assert answer_of(done.capabilities, None) is None
    assert answer_of(None, done.driver) is None
