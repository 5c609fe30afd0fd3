"""The Debian package: ``make deb`` builds it with debhelper, lintian finds nothing to report.

Checked on the built .deb itself (dpkg-deb): every file the package must install, the
dependencies it must not take from Debian (its own copies of dbus-fast, qemu.qmp, pyudev and
aiosqlite in /usr/share/vfiocaps), the pinned versions it carries, pure Python only, launchers
that keep the caller's environment out, and maintainer scripts that are valid shell and do what
docs/install.md says. The install itself, on a clean Debian 12 chroot and on the lab's Debian 13
with systemd, is ``scripts/try-deb`` and ``tests/lab/guest/test_zz_package.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from support.harness import REPO, have


@pytest.fixture(scope="module", autouse=True)
def build_tools() -> None:
    """The package is part of every run: missing tools are a failure, not a skip."""
    missing = [
        tool for tool in ("dpkg-buildpackage", "dh", "dh_python3", "lintian") if not have(tool)
    ]
    assert not missing, f"{missing} not installed: scripts/bootstrap installs scripts/apt-packages"


VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PINNED = dict(
    line.split("==")
    for line in (REPO / "scripts/vendor-requirements.txt").read_text().splitlines()
    if line and not line.startswith("#")
)
EXPECTED = (
    "/usr/bin/vfiocapsd",
    "/usr/bin/vfiocapsctl",
    "/lib/systemd/system/vfiocapsd.service",
    "/usr/lib/sysusers.d/vfiocaps.conf",
    "/lib/udev/rules.d/70-vfiocaps.rules",
    "/usr/share/dbus-1/system.d/org.vfiocaps.conf",
    "/usr/share/dbus-1/system-services/org.vfiocaps.service",
    "/usr/share/dbus-1/interfaces/org.vfiocaps1.xml",
    "/usr/share/polkit-1/actions/org.vfiocaps.policy",
    "/usr/share/man/man1/vfiocapsctl.1.gz",
    "/usr/share/man/man8/vfiocapsd.8.gz",
    "/usr/share/bash-completion/completions/vfiocapsctl",
    "/usr/share/bash-completion/completions/vfiocapsd",
    "/usr/share/doc/vfiocaps/copyright",
    "/usr/share/vfiocaps/vfiocaps/daemon.py",
    "/usr/share/vfiocaps/vfiocaps/prober/vfiofeatures.py",
    "/usr/share/vfiocaps/dbus_fast/message_bus.py",
    "/usr/share/vfiocaps/qemu/qmp/protocol.py",
    "/usr/share/vfiocaps/pyudev/monitor.py",
    "/usr/share/vfiocaps/aiosqlite/core.py",
)


def run(
    *argv: str, cwd: Path = REPO, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``make deb`` for the module, into a directory of its own."""
    dist = tmp_path_factory.mktemp("dist")
    built = run("make", "deb", f"DISTDIR={dist}")
    assert built.returncode == 0, f"make deb failed:\n{built.stdout}\n{built.stderr[-4000:]}"
    found = sorted(dist.glob("*.deb"))
    assert [path.name for path in found] == [f"vfiocaps_{VERSION}_all.deb"]
    return found[0]


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    assert run("dpkg-deb", "-x", str(deb), str(root)).returncode == 0
    assert run("dpkg-deb", "-e", str(deb), str(root / "DEBIAN")).returncode == 0
    return root


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", str(deb), name).stdout.strip()


def test_lintian_reports_nothing(deb: Path, tmp_path: Path) -> None:
    # lintian leaves its ELF cache (mldbm-elf-*) in TMPDIR: give it one that is removed.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    flags = ("--pedantic", "--fail-on", "error,warning,info,pedantic")
    result = run("lintian", *flags, str(deb), env=env)
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert tags == [], "\n".join(tags)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_installs_every_file(deb: Path, unpacked: Path) -> None:
    missing = [path for path in EXPECTED if not (unpacked / path.lstrip("/")).is_file()]
    assert missing == []
    unit = (unpacked / "lib/systemd/system/vfiocapsd.service").read_text()
    assert "ExecStart=/usr/bin/vfiocapsd --system\n" in unit
    activation = (unpacked / "usr/share/dbus-1/system-services/org.vfiocaps.service").read_text()
    assert "Exec=/usr/bin/vfiocapsd --system\n" in activation
    assert field(deb, "Version") == VERSION
    assert field(deb, "Architecture") == "all"


def test_package_carries_its_pinned_dependencies_and_takes_none_from_debian(
    deb: Path, unpacked: Path
) -> None:
    depends = field(deb, "Depends")
    for name in ("dbus-fast", "qemu.qmp", "qemu-qmp", "pyudev", "aiosqlite"):
        assert f"python3-{name}" not in depends, depends
    assert "python3:any (>= 3.11~)" in depends
    modules = unpacked / "usr/share/vfiocaps"
    for name, version in PINNED.items():
        dist = name.replace("-", "_").replace(".", "_")
        assert (modules / f"{dist}-{version}.dist-info").is_dir(), f"{name} {version} not carried"
    compiled = [str(path) for path in modules.rglob("*") if path.suffix in (".so", ".pyc")]
    assert compiled == [], "the package ships pure Python, byte-compiled on the target"


def test_launchers_keep_the_callers_environment_out(unpacked: Path, tmp_path: Path) -> None:
    """A PYTHONPATH, or a module beside the launcher or in the current directory, must not
    choose the code root runs: not vfiocaps, and not a module of Python's own (argparse)."""
    launcher = (unpacked / "usr/bin/vfiocapsd").read_text()
    assert 'sys.path.insert(0, "/usr/share/vfiocaps")' in launcher
    assert "from vfiocaps.daemon import main" in launcher
    # Run the launcher itself (its #! line decides) against the unpacked modules: the same
    # text with the directory rewritten.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    copy = bindir / "vfiocapsd"
    copy.write_text(launcher.replace("/usr/share/vfiocaps", str(unpacked / "usr/share/vfiocaps")))
    copy.chmod(0o755)
    evil = tmp_path / "evil"
    for where in (evil, bindir, tmp_path):
        (where / "vfiocaps").mkdir(parents=True)
        (where / "vfiocaps" / "__init__.py").write_text(f"raise SystemExit('{where} chose')\n")
        (where / "argparse.py").write_text(f"raise SystemExit('{where} chose argparse')\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(evil)}
    result = subprocess.run(
        [str(copy), "--version"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"vfiocapsd {VERSION}")


def test_maintainer_scripts(unpacked: Path) -> None:
    names = ("postinst", "prerm", "postrm")
    scripts = {name: (unpacked / "DEBIAN" / name).read_text() for name in names}
    for name in scripts:
        assert run("sh", "-n", str(unpacked / "DEBIAN" / name)).returncode == 0, name
    assert (
        'systemd-sysusers ${DPKG_ROOT:+--root="$DPKG_ROOT"} vfiocaps.conf' in (scripts["postinst"])
    )
    assert "try-restart 'vfiocapsd.service'" in scripts["postinst"]
    assert "udevadm control --reload" in scripts["postinst"]
    assert "py3compile -p vfiocaps /usr/share/vfiocaps" in scripts["postinst"]
    assert "deb-systemd-invoke stop vfiocapsd.service" in scripts["prerm"]
    assert (
        'rm -rf "${DPKG_ROOT:-}/var/cache/vfiocaps" "${DPKG_ROOT:-}/run/vfiocaps"'
        in (scripts["postrm"])
    )
    # The bus reloads its policy and activation files by its own trigger (no script of ours).
    triggers = Path("/var/lib/dpkg/info").glob("dbus*.triggers")
    watched = "".join(path.read_text() for path in triggers)
    assert "interest-noawait /usr/share/dbus-1/system.d" in watched
    assert "interest-noawait /usr/share/dbus-1/system-services" in watched
