"""The NFD feature file's directory is vetted like the runtime directory, its old content read
with a bound, its labels expire unless refreshed, and it goes when the daemon stops publishing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from support.daemon_lab import Lab
from support.engine_rig import driver
from support.harness import wait_until
from support.nfd_format import expiry_time, read_labels
from vfiocaps.capabilities import Capabilities, Display, Migration
from vfiocaps.engine import TypeView
from vfiocaps.errors import UnsafeDirectoryError
from vfiocaps.nfdfile import FeatureFile
from vfiocaps.nfdlabels import LABEL_PREFIX, NfdLabelWriter, labels_of

P = LABEL_PREFIX + "/"
MTTY = Capabilities(display=Display.NONE, gl_required=False, migration=Migration.SUPPORTED)


def views() -> list[TypeView]:
    return [
        TypeView(
            parent="mtty",
            type_id="mtty-1",
            name="mtty-1",
            description="",
            device_api="vfio-pci",
            available_instances=1,
            instances=0,
            driver=driver("mtty"),
            capabilities=MTTY,
        )
    ]


def test_a_type_that_migrates_with_qemus_defaults_says_so_with_options_too() -> None:
    labels = labels_of(views())
    assert labels[P + "mtty-1.migration-with-options"] == "supported"
    assert labels[P + "mtty-1.migration"] == "supported"


async def test_a_symlinked_features_directory_is_not_followed(tmp_path: Path) -> None:
    """features.d is a link another user planted (its parent is theirs to change): root writes
    nothing in the link's target and deletes nothing there."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "vfiocaps").write_text("theirs\n")
    (tmp_path / "features.d").symlink_to(target)
    writer = NfdLabelWriter(FeatureFile(tmp_path / "features.d"), views, settle=0)
    await writer.update()
    await writer.close()
    assert sorted(os.listdir(target)) == ["vfiocaps"]
    assert (target / "vfiocaps").read_text() == "theirs\n"
    with pytest.raises(UnsafeDirectoryError, match="is a symbolic link"):
        FeatureFile(tmp_path / "features.d").write("x\n")
    # A link further up is refused as well.
    (tmp_path / "up").symlink_to(tmp_path)
    with pytest.raises(UnsafeDirectoryError, match="is a symbolic link"):
        FeatureFile(tmp_path / "up" / "target").write("x\n")
    assert (target / "vfiocaps").read_text() == "theirs\n"


def test_a_directory_others_may_change_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may swap features.d inside
    (shared / "features.d").mkdir()
    with pytest.raises(UnsafeDirectoryError, match="may be written by other users"):
        FeatureFile(shared / "features.d").write("x\n")
    assert os.listdir(shared / "features.d") == []
    open_dir = tmp_path / "open.d"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(UnsafeDirectoryError, match="written by its group or by everybody"):
        FeatureFile(open_dir).write("x\n")
    foreign = tmp_path / "foreign.d"
    foreign.mkdir()
    os.chown(foreign, 4242, 4242)
    with pytest.raises(UnsafeDirectoryError, match="owned by uid 4242"):
        FeatureFile(foreign).write("x\n")
    assert os.listdir(open_dir) == []
    assert os.listdir(foreign) == []


def test_no_parent_is_created(tmp_path: Path) -> None:
    with pytest.raises(UnsafeDirectoryError, match="does not exist"):
        FeatureFile(tmp_path / "missing" / "features.d").write("x\n")
    assert not (tmp_path / "missing").exists()
    FeatureFile(tmp_path / "features.d").write("x\n")  # the last component only
    assert (tmp_path / "features.d" / "vfiocaps").read_text() == "x\n"


# The reader's peak resident size in KiB: VmHWM belongs to the memory of this program (exec
# starts it afresh), while ru_maxrss carries the forking pytest worker's peak over.
READER = """
import sys
from pathlib import Path
from vfiocaps.nfdfile import FeatureFile
text = FeatureFile(Path(sys.argv[1])).read()
status = Path("/proc/self/status").read_text().splitlines()
peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print(repr(text)[:20], peak)
"""


@pytest.mark.parametrize("linked", [True, False])
def test_the_old_file_is_read_with_a_bound(tmp_path: Path, linked: bool) -> None:
    """A link to a 1 GiB sparse file (or such a file itself) in features.d: the daemon reads at
    most 64 KiB + 1 of it, never the whole."""
    huge = tmp_path / "huge"
    with huge.open("wb") as stream:
        stream.truncate(1 << 30)
    directory = tmp_path / "features.d"
    directory.mkdir()
    if linked:
        (directory / "vfiocaps").symlink_to(huge)
    else:
        huge.rename(directory / "vfiocaps")
    out = subprocess.run(
        [sys.executable, "-c", READER, str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert out[0] == "None"
    assert int(out[1]) < 200 * 1024, f"max RSS {out[1]} KiB"


async def test_the_expiry_is_refreshed_while_the_writer_runs(tmp_path: Path) -> None:
    writer = NfdLabelWriter(FeatureFile(tmp_path), views, settle=0, expiry=30.0, refresh=0.3)
    path = tmp_path / "vfiocaps"
    writer.start()
    try:
        await asyncio.sleep(0.2)
        first = expiry_time(path)
        assert first is not None
        now = datetime.now(UTC)
        assert now + timedelta(seconds=25) < first <= now + timedelta(seconds=31)
        assert path.read_text().startswith("# +expiry-time=")
        assert read_labels(path, now=now)[P + "mtty-1.display"] == "none"
        assert read_labels(path, now=first + timedelta(seconds=1)) == {}  # NFD drops them then

        def renewed() -> bool:
            moment = expiry_time(path)
            return moment is not None and moment > first

        for _ in range(40):
            await asyncio.sleep(0.1)
            if renewed():
                break
        assert renewed()
    finally:
        await writer.close()
    assert not path.exists()  # a clean stop removes the labels


def test_the_daemon_removes_its_labels_on_a_stop_and_when_turned_off(lab: Lab) -> None:
    features = lab.directory / "features.d"
    path = features / "vfiocaps"
    lab.host.build("mtty")
    daemon = lab.start(f"--nfd-labels={features}")
    one = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({one: "done"})
    wait_until(lambda: path.exists() and P + "mtty-1.display" in read_labels(path), 20, "labels")
    assert expiry_time(path) is not None
    published = path.read_text()
    record = lab.directory / "cache" / "nfd-labels-directory"
    assert record.read_text() == f"{features}\n"
    assert daemon.stop() == 0
    assert not path.exists()
    assert not record.exists()
    # A daemon killed outright leaves its file (NFD lets it expire) and its record; a start
    # with --nfd-labels off removes the file, and leaves a file it did not write alone.
    path.write_text(published)
    record.write_text(f"{features}\n")
    (features / "other").write_text(published)
    second = lab.start(name="second")
    wait_until(lambda: not path.exists(), 20, "the stale labels to go")
    assert (features / "other").exists()
    assert not record.exists()
    assert "Traceback" not in second.log()
